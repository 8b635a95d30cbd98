//! A real browser for a page: Debian's headless Chromium, driven through ChromeDriver's
//! WebDriver protocol (W3C WebDriver, the HTTP + JSON endpoints a test needs and no more).
//! ChromeDriver runs as the leader of its own process group: it and the browser go with it.

use std::path::Path;
use std::process::{Command, Stdio};

use base64::Engine as _;
use http_body_util::BodyExt;
use regtee::local_process::LocalProcess;
use serde_json::{Value, json};

/// The W3C key an element reference comes under.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Browser {
    base: String,
    session: String,
    client: regtee::http_client::HttpClient,
    _driver: LocalProcess,
}

impl Browser {
    /// Starts ChromeDriver and a headless Chromium with a profile under `dir`.
    pub async fn start(dir: &Path) -> Browser {
        let port = regtee::local_registry::free_port().unwrap();
        let mut command = Command::new("chromedriver");
        command
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let driver = LocalProcess::spawn(command)
            .expect("chromedriver runs (apt-get install chromium chromium-driver)");
        super::wait_listening(([127, 0, 0, 1], port).into()).await;
        let mut browser = Browser {
            base: format!("http://127.0.0.1:{port}"),
            session: String::new(),
            client: super::raw_http_client(None, false),
            _driver: driver,
        };
        let profile = dir.join("chromium-profile");
        std::fs::create_dir_all(&profile).unwrap();
        // The flags the machine's notes give for a closed network: no background connections.
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--window-size=1280,1000",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        }}});
        let created = browser.call("POST", "/session", Some(capabilities)).await;
        browser.session = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"))
            .to_string();
        browser
    }

    /// One WebDriver command; its `value`.
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let request = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(regtee::body::full(
                body.map(|b| b.to_string()).unwrap_or_default(),
            ))
            .unwrap();
        let response = self.client.request(request).await.unwrap();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let answer: Value = serde_json::from_slice(&bytes).unwrap();
        answer["value"].clone()
    }

    fn at(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    pub async fn goto(&self, url: &str) {
        self.call("POST", &self.at("/url"), Some(json!({"url": url})))
            .await;
    }

    /// The element `css` selects; panics naming it when there is none.
    async fn find(&self, css: &str) -> String {
        let found = self
            .call(
                "POST",
                &self.at("/element"),
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        found[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {found}"))
            .to_string()
    }

    pub async fn click(&self, css: &str) {
        let id = self.find(css).await;
        self.call(
            "POST",
            &self.at(&format!("/element/{id}/click")),
            Some(json!({})),
        )
        .await;
    }

    pub async fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css).await;
        self.call(
            "POST",
            &self.at(&format!("/element/{id}/value")),
            Some(json!({"text": text})),
        )
        .await;
    }

    /// The page as the browser has it now.
    pub async fn source(&self) -> String {
        self.call("GET", &self.at("/source"), None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The visible text of the page.
    pub async fn text(&self) -> String {
        let body = self.find("body").await;
        self.call("GET", &self.at(&format!("/element/{body}/text")), None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// A PNG of the window.
    pub async fn screenshot(&self) -> Vec<u8> {
        let encoded = self.call("GET", &self.at("/screenshot"), None).await;
        base64::engine::general_purpose::STANDARD
            .decode(encoded.as_str().unwrap_or_default())
            .unwrap()
    }

    /// Closes the browser; ChromeDriver goes with the value.
    pub async fn quit(self) {
        self.call("DELETE", &self.at(""), None).await;
    }
}
