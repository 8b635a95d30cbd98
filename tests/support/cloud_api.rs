//! Cloud management APIs as their providers document them, in front of the names a fault
//! front's `...MustExist` quirk lets through: a namespace or repository created here exists
//! for the registry front at once. Each front checks the request's signature with its own
//! code, written from the provider's documentation (not regtee's), and refuses a wrong one
//! with the documented error.
//!
//! - TCR: TencentCloud API 3.0, TC3-HMAC-SHA256 ("Signature v3"); `DescribeNamespaces`,
//!   `CreateNamespace` (tcr 2019-09-24); errors as `Response.Error` with HTTP 200
//!   ("Common Error Codes": `AuthFailure.SignatureFailure`, `AuthFailure.SecretIdNotFound`).
//! - SWR: Huawei Cloud API signing (SDK-HMAC-SHA256, "API Signing Guide"); SWR API v2
//!   `GET /v2/manage/namespaces/{namespace}`, `POST /v2/manage/namespaces`; a bad signature
//!   is the API gateway's `401 APIGW.0301` ("Incorrect IAM authentication information").
//! - ECR: AWS JSON 1.1 with SigV4 ("Create a signed AWS API request"); `DescribeRepositories`
//!   (`RepositoryNotFoundException`), `CreateRepository` (`RepositoryAlreadyExistsException`);
//!   a bad signature is `InvalidSignatureException`, an unknown key
//!   `UnrecognizedClientException`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use super::serve::serve;
use sha2::{Digest as _, Sha256};

/// Which API, with the one key pair it accepts.
#[derive(Clone, Debug)]
pub enum Flavor {
    Tcr {
        secret_id: String,
        secret_key: String,
    },
    Swr {
        access_key: String,
        secret_key: String,
    },
    /// Harbor's REST API v2.0 with Basic credentials; `admin` is the login's `sysadmin_flag`.
    Harbor {
        user: String,
        password: String,
        admin: bool,
    },
    /// `session_token`: the key is a role's (from IMDS or a container endpoint), and each
    /// request must carry its `X-Amz-Security-Token`, signed.
    Ecr {
        key_id: String,
        secret: String,
        session_token: Option<String>,
    },
}

/// What the front saw.
#[derive(Default)]
pub struct Seen {
    /// Each call: its action (`CreateNamespace`, `GET /v2/manage/namespaces/x`, ...).
    pub calls: Vec<String>,
    /// Calls refused for their signature or key.
    pub refused: Vec<String>,
    /// ECR: each repository's settings as created.
    pub settings: BTreeMap<String, serde_json::Value>,
    /// Every request's headers, to check what reached this origin.
    pub headers: Vec<String>,
}

/// A management API front on loopback.
pub struct CloudApi {
    pub addr: SocketAddr,
    delay: Arc<Mutex<std::time::Duration>>,
    redirect: Arc<Mutex<Option<String>>>,
    pub seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CloudApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Front {
    /// How long each answer is held: a slow API, so that callers at once overlap.
    delay: Arc<Mutex<std::time::Duration>>,
    /// When set, every answer is a `307` to this URL (an endpoint that names another host).
    redirect: Arc<Mutex<Option<String>>>,
    flavor: Flavor,
    existing: Arc<Mutex<BTreeSet<String>>>,
    seen: Arc<Mutex<Seen>>,
}

impl CloudApi {
    /// Starts an API front whose creations land in `existing` (a fault front's names).
    pub async fn start(flavor: Flavor, existing: Arc<Mutex<BTreeSet<String>>>) -> CloudApi {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let delay = Arc::new(Mutex::new(std::time::Duration::ZERO));
        let redirect = Arc::new(Mutex::new(None));
        let front = Arc::new(Front {
            delay: delay.clone(),
            redirect: redirect.clone(),
            flavor,
            existing,
            seen: seen.clone(),
        });
        let task = serve(listener, move |req| {
            let front = front.clone();
            async move { front.handle(req).await }
        });
        CloudApi {
            addr,
            delay,
            redirect,
            seen,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answers every request from now on with a `307` to `url`.
    pub fn redirect_to(&self, url: &str) {
        *self.redirect.lock().unwrap() = Some(url.to_string());
    }

    /// Holds every answer this long from now on.
    pub fn set_delay(&self, delay: std::time::Duration) {
        *self.delay.lock().unwrap() = delay;
    }

    /// Calls whose name starts with `prefix`.
    pub fn calls(&self, prefix: &str) -> usize {
        let seen = self.seen.lock().unwrap();
        seen.calls.iter().filter(|c| c.starts_with(prefix)).count()
    }

    pub fn all_calls(&self) -> Vec<String> {
        self.seen.lock().unwrap().calls.clone()
    }
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn hex_sha256(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn hmac(key: &[u8], msg: &str) -> Vec<u8> {
    use hmac::{KeyInit, Mac};
    let mut m = hmac::Hmac::<Sha256>::new_from_slice(key).unwrap();
    m.update(msg.as_bytes());
    m.finalize().into_bytes().to_vec()
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> &'h str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

/// `Key=value, Key=value` after the scheme word of an Authorization header.
fn auth_fields(value: &str) -> BTreeMap<String, String> {
    let rest = value.split_once(' ').map(|(_, r)| r).unwrap_or_default();
    rest.split(',')
        .filter_map(|kv| kv.trim().split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The canonical headers of `signed` (names `;`-separated), with values as the scheme wants.
fn canonical_headers(headers: &HeaderMap, signed: &str, lowercase_values: bool) -> String {
    signed
        .split(';')
        .map(|name| {
            let value = header(headers, name).trim();
            let value = if lowercase_values {
                value.to_ascii_lowercase()
            } else {
                value.to_string()
            };
            format!("{name}:{value}\n")
        })
        .collect()
}

impl Front {
    async fn handle(&self, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let (parts, body) = req.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let delay = *self.delay.lock().unwrap();
        tokio::time::sleep(delay).await;
        if let Some(url) = self.redirect.lock().unwrap().clone() {
            self.record("redirected".into());
            return Response::builder()
                .status(StatusCode::TEMPORARY_REDIRECT)
                .header("location", url)
                .body(Full::new(Bytes::new()))
                .unwrap();
        }
        self.seen
            .lock()
            .unwrap()
            .headers
            .push(format!("{:?}", parts.headers));
        match &self.flavor {
            Flavor::Tcr {
                secret_id,
                secret_key,
            } => self.tcr(&parts, &body, secret_id, secret_key),
            Flavor::Swr {
                access_key,
                secret_key,
            } => self.swr(&parts, &body, access_key, secret_key),
            Flavor::Ecr {
                key_id,
                secret,
                session_token,
            } => self.ecr(&parts, &body, key_id, secret, session_token.as_deref()),
            Flavor::Harbor {
                user,
                password,
                admin,
            } => self.harbor(&parts, &body, user, password, *admin),
        }
    }

    fn record(&self, call: String) {
        self.seen.lock().unwrap().calls.push(call);
    }

    fn refuse(&self, why: &str) {
        self.seen.lock().unwrap().refused.push(why.to_string());
    }

    fn tcr(
        &self,
        parts: &http::request::Parts,
        body: &Bytes,
        secret_id: &str,
        secret_key: &str,
    ) -> Response<Full<Bytes>> {
        let error = |code: &str, message: &str| {
            reply(
                StatusCode::OK,
                serde_json::json!({"Response": {"Error": {"Code": code, "Message": message}, "RequestId": "test-request"}}),
            )
        };
        let headers = &parts.headers;
        let fields = auth_fields(header(headers, "authorization"));
        let credential = fields.get("Credential").cloned().unwrap_or_default();
        let mut scope = credential.splitn(2, '/');
        let (id, scope) = (
            scope.next().unwrap_or_default(),
            scope.next().unwrap_or_default(),
        );
        if id != secret_id {
            self.refuse("SecretIdNotFound");
            return error(
                "AuthFailure.SecretIdNotFound",
                "The SecretId is not found, please ensure that your SecretId is correct.",
            );
        }
        let signed = fields.get("SignedHeaders").cloned().unwrap_or_default();
        let canonical = format!(
            "{}\n{}\n{}\n{}\n{signed}\n{}",
            parts.method,
            parts.uri.path(),
            parts.uri.query().unwrap_or_default(),
            canonical_headers(headers, &signed, true),
            hex_sha256(body)
        );
        let timestamp = header(headers, "x-tc-timestamp");
        let date = scope.split('/').next().unwrap_or_default();
        let to_sign = format!(
            "TC3-HMAC-SHA256\n{timestamp}\n{scope}\n{}",
            hex_sha256(canonical.as_bytes())
        );
        let key = hmac(format!("TC3{secret_key}").as_bytes(), date);
        let key = hmac(&key, "tcr");
        let key = hmac(&key, "tc3_request");
        let expected = hex::encode(hmac(&key, &to_sign));
        if !signed.split(';').any(|h| h == "host")
            || fields.get("Signature") != Some(&expected)
            || !scope.ends_with("/tcr/tc3_request")
        {
            self.refuse("SignatureFailure");
            return error(
                "AuthFailure.SignatureFailure",
                "The provided credentials could not be validated. Please check your signature is correct.",
            );
        }
        let action = header(headers, "x-tc-action").to_string();
        let request: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let name = request["NamespaceName"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        self.record(action.clone());
        match action.as_str() {
            "DescribeNamespaces" => {
                let existing = self.existing.lock().unwrap();
                let list: Vec<_> = existing
                    .iter()
                    .filter(|n| !n.contains('/') && n.contains(&name))
                    .map(|n| serde_json::json!({"Name": n, "Public": false}))
                    .collect();
                reply(
                    StatusCode::OK,
                    serde_json::json!({"Response": {"NamespaceList": list, "TotalCount": list.len(), "RequestId": "test-request"}}),
                )
            }
            "CreateNamespace" => {
                if request["IsPublic"] != false {
                    return error("InvalidParameter", "IsPublic must be false in this test");
                }
                if !self.existing.lock().unwrap().insert(name) {
                    return error("ResourceInUse", "namespace exists");
                }
                reply(
                    StatusCode::OK,
                    serde_json::json!({"Response": {"RequestId": "test-request"}}),
                )
            }
            _ => error("InvalidAction", "unknown action"),
        }
    }

    fn swr(
        &self,
        parts: &http::request::Parts,
        body: &Bytes,
        access_key: &str,
        secret_key: &str,
    ) -> Response<Full<Bytes>> {
        let headers = &parts.headers;
        let fields = auth_fields(header(headers, "authorization"));
        let signed = fields.get("SignedHeaders").cloned().unwrap_or_default();
        let path = parts.uri.path();
        let path = if path.ends_with('/') {
            path.to_string()
        } else {
            format!("{path}/")
        };
        let canonical = format!(
            "{}\n{path}\n{}\n{}\n{signed}\n{}",
            parts.method,
            parts.uri.query().unwrap_or_default(),
            canonical_headers(headers, &signed, false),
            hex_sha256(body)
        );
        let to_sign = format!(
            "SDK-HMAC-SHA256\n{}\n{}",
            header(headers, "x-sdk-date"),
            hex_sha256(canonical.as_bytes())
        );
        let expected = hex::encode(hmac(secret_key.as_bytes(), &to_sign));
        if fields.get("Access").map(String::as_str) != Some(access_key)
            || fields.get("Signature") != Some(&expected)
            || !signed.split(';').any(|h| h == "x-sdk-date")
        {
            self.refuse("APIGW.0301");
            return reply(
                StatusCode::UNAUTHORIZED,
                serde_json::json!({"error_msg": "Incorrect IAM authentication information: verify aksk signature fail", "error_code": "APIGW.0301", "request_id": "test-request"}),
            );
        }
        let call = format!("{} {}", parts.method, parts.uri.path());
        self.record(call);
        let listing = "/v2/manage/namespaces";
        match (parts.method.as_str(), parts.uri.path()) {
            ("GET", p) if p == listing => {
                let existing = self.existing.lock().unwrap();
                let list: Vec<_> = existing
                    .iter()
                    .filter(|n| !n.contains('/'))
                    .map(|n| serde_json::json!({"name": n}))
                    .collect();
                reply(StatusCode::OK, serde_json::json!({"namespaces": list}))
            }
            ("GET", p) => {
                let name = p.trim_start_matches(listing).trim_start_matches('/');
                if self.existing.lock().unwrap().contains(name) {
                    reply(StatusCode::OK, serde_json::json!({"name": name}))
                } else {
                    reply(
                        StatusCode::NOT_FOUND,
                        serde_json::json!({"errorCode": "SVCSTG.SWR.4040000", "errorMessage": "Namespace not found"}),
                    )
                }
            }
            ("POST", p) if p == listing => {
                let request: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
                let name = request["namespace"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                if self.existing.lock().unwrap().insert(name) {
                    reply(StatusCode::CREATED, serde_json::json!({}))
                } else {
                    reply(
                        StatusCode::CONFLICT,
                        serde_json::json!({"errorCode": "SVCSTG.SWR.4090000", "errorMessage": "Namespace already exists"}),
                    )
                }
            }
            _ => reply(StatusCode::NOT_FOUND, serde_json::json!({})),
        }
    }

    /// Harbor 2.x: `HEAD /api/v2.0/projects?project_name=` 200 or 404, `POST /api/v2.0/projects`
    /// 201 or 409, `GET /users/current`, `GET /systeminfo`; 401 `UNAUTHORIZED` for a wrong login,
    /// 403 `FORBIDDEN` for a creation a non-admin may not make (Harbor's API reference).
    fn harbor(
        &self,
        parts: &http::request::Parts,
        body: &Bytes,
        user: &str,
        password: &str,
        admin: bool,
    ) -> Response<Full<Bytes>> {
        use base64::Engine as _;
        let errors = |status: StatusCode, code: &str, message: &str| {
            reply(
                status,
                serde_json::json!({"errors": [{"code": code, "message": message}]}),
            )
        };
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        if header(&parts.headers, "authorization") != expected {
            self.refuse("UNAUTHORIZED");
            return errors(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "unauthorized");
        }
        let path = parts.uri.path();
        self.record(format!("{} {path}", parts.method));
        match (parts.method.as_str(), path) {
            ("HEAD", "/api/v2.0/projects") => {
                let name = parts
                    .uri
                    .query()
                    .and_then(|q| q.strip_prefix("project_name="))
                    .unwrap_or_default();
                let status = if self.existing.lock().unwrap().contains(name) {
                    StatusCode::OK
                } else {
                    StatusCode::NOT_FOUND
                };
                reply(status, serde_json::json!({}))
            }
            ("POST", "/api/v2.0/projects") => {
                if !admin {
                    // Hostile, as some servers are: the refusal echoes the credentials sent.
                    return errors(
                        StatusCode::FORBIDDEN,
                        "FORBIDDEN",
                        &format!(
                            "Only system admin can create project (you sent {expected}, that is {user}:{password})"
                        ),
                    );
                }
                let request: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
                if request["metadata"]["public"] != "false" {
                    return errors(
                        StatusCode::BAD_REQUEST,
                        "BAD_REQUEST",
                        "expected a private project",
                    );
                }
                let name = request["project_name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                if self.existing.lock().unwrap().insert(name) {
                    reply(StatusCode::CREATED, serde_json::json!({}))
                } else {
                    errors(
                        StatusCode::CONFLICT,
                        "CONFLICT",
                        "The project named already exists",
                    )
                }
            }
            ("GET", "/api/v2.0/users/current") => reply(
                StatusCode::OK,
                serde_json::json!({"username": user, "sysadmin_flag": admin}),
            ),
            ("GET", "/api/v2.0/systeminfo") => reply(
                StatusCode::OK,
                serde_json::json!({"project_creation_restriction": "adminonly"}),
            ),
            _ => errors(StatusCode::NOT_FOUND, "NOT_FOUND", "not found"),
        }
    }

    fn ecr(
        &self,
        parts: &http::request::Parts,
        body: &Bytes,
        key_id: &str,
        secret: &str,
        session_token: Option<&str>,
    ) -> Response<Full<Bytes>> {
        let error = |kind: &str, message: &str| {
            reply(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"__type": kind, "message": message}),
            )
        };
        let headers = &parts.headers;
        let fields = auth_fields(header(headers, "authorization"));
        let credential = fields.get("Credential").cloned().unwrap_or_default();
        let mut scope = credential.splitn(2, '/');
        let (id, scope) = (
            scope.next().unwrap_or_default(),
            scope.next().unwrap_or_default(),
        );
        if id != key_id {
            self.refuse("UnrecognizedClientException");
            return error(
                "UnrecognizedClientException",
                "The security token included in the request is invalid.",
            );
        }
        let signed = fields.get("SignedHeaders").cloned().unwrap_or_default();
        let canonical = format!(
            "{}\n{}\n{}\n{}\n{signed}\n{}",
            parts.method,
            parts.uri.path(),
            parts.uri.query().unwrap_or_default(),
            canonical_headers(headers, &signed, false),
            hex_sha256(body)
        );
        let to_sign = format!(
            "AWS4-HMAC-SHA256\n{}\n{scope}\n{}",
            header(headers, "x-amz-date"),
            hex_sha256(canonical.as_bytes())
        );
        let mut parts_of_scope = scope.split('/');
        let mut key = format!("AWS4{secret}").into_bytes();
        for part in parts_of_scope.by_ref().take(4) {
            key = hmac(&key, part);
        }
        let expected = hex::encode(hmac(&key, &to_sign));
        if fields.get("Signature") != Some(&expected)
            || !scope.ends_with("/ecr/aws4_request")
            || !signed.split(';').any(|h| h == "x-amz-target")
            || session_token.is_some_and(|t| {
                header(headers, "x-amz-security-token") != t
                    || !signed.split(';').any(|h| h == "x-amz-security-token")
            })
        {
            self.refuse("InvalidSignatureException");
            return error(
                "InvalidSignatureException",
                "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method. Consult the service documentation for details.",
            );
        }
        let action = header(headers, "x-amz-target")
            .rsplit('.')
            .next()
            .unwrap_or_default()
            .to_string();
        self.record(action.clone());
        let request: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        match action.as_str() {
            "DescribeRepositories" => {
                let existing = self.existing.lock().unwrap();
                let names: Vec<String> = match request["repositoryNames"].as_array() {
                    Some(asked) => asked
                        .iter()
                        .filter_map(|n| n.as_str().map(String::from))
                        .collect(),
                    None => existing.iter().cloned().collect(),
                };
                if let Some(missing) = names.iter().find(|n| !existing.contains(*n)) {
                    return error(
                        "RepositoryNotFoundException",
                        &format!(
                            "The repository with name '{missing}' does not exist in the registry with id '123456789012'"
                        ),
                    );
                }
                let list: Vec<_> = names
                    .iter()
                    .map(|n| serde_json::json!({"repositoryName": n}))
                    .collect();
                reply(StatusCode::OK, serde_json::json!({"repositories": list}))
            }
            "CreateRepository" => {
                let name = request["repositoryName"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                if !self.existing.lock().unwrap().insert(name.clone()) {
                    return error(
                        "RepositoryAlreadyExistsException",
                        &format!(
                            "The repository with name '{name}' already exists in the registry with id '123456789012'"
                        ),
                    );
                }
                self.seen
                    .lock()
                    .unwrap()
                    .settings
                    .insert(name.clone(), request.clone());
                reply(
                    StatusCode::OK,
                    serde_json::json!({"repository": {"repositoryName": name, "imageTagMutability": request["imageTagMutability"], "imageScanningConfiguration": request["imageScanningConfiguration"]}}),
                )
            }
            _ => error("UnknownOperationException", "unknown operation"),
        }
    }
}

/// The EC2 instance metadata service, IMDSv2 only ("Use the Instance Metadata Service to
/// access instance metadata", "Retrieve security credentials from instance metadata" in the
/// EC2 user guide): `PUT /latest/api/token` with a TTL header gives a session token, which
/// every `GET` must carry (401 without); the role's name, then its temporary key.
pub struct Imds {
    pub addr: SocketAddr,
    pub gets_without_token: Arc<Mutex<u32>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Imds {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the instance metadata service answers.
struct ImdsAnswers {
    role: String,
    credentials: String,
    gets_without_token: Arc<Mutex<u32>>,
}

impl ImdsAnswers {
    fn answer(&self, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let text = |status: StatusCode, body: String| {
            Response::builder()
                .status(status)
                .body(Full::new(Bytes::from(body)))
                .unwrap()
        };
        let path = req.uri().path();
        let roles = "/latest/meta-data/iam/security-credentials/";
        if req.method() == http::Method::PUT && path == "/latest/api/token" {
            return match req
                .headers()
                .contains_key("x-aws-ec2-metadata-token-ttl-seconds")
            {
                true => text(StatusCode::OK, "imds-session-token".into()),
                false => text(StatusCode::BAD_REQUEST, String::new()),
            };
        }
        if header(req.headers(), "x-aws-ec2-metadata-token") != "imds-session-token" {
            *self.gets_without_token.lock().unwrap() += 1;
            return text(StatusCode::UNAUTHORIZED, String::new());
        }
        match path.strip_prefix(roles) {
            Some("") => text(StatusCode::OK, self.role.clone()),
            Some(role) if role == self.role => text(StatusCode::OK, self.credentials.clone()),
            _ => text(StatusCode::NOT_FOUND, String::new()),
        }
    }
}

impl Imds {
    pub async fn start(role: &str, key_id: &str, secret: &str, session_token: &str) -> Imds {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let gets_without_token = Arc::new(Mutex::new(0));
        let credentials = serde_json::json!({
            "Code": "Success", "Type": "AWS-HMAC", "AccessKeyId": key_id,
            "SecretAccessKey": secret, "Token": session_token,
            "Expiration": "2099-01-01T00:00:00Z", "LastUpdated": "2026-01-01T00:00:00Z",
        })
        .to_string();
        let answers = Arc::new(ImdsAnswers {
            role: role.to_string(),
            credentials,
            gets_without_token: gets_without_token.clone(),
        });
        let task = serve(listener, move |req| {
            let answers = answers.clone();
            async move { answers.answer(&req) }
        });
        Imds {
            addr,
            gets_without_token,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}
