//! A real nginx process (Debian's `nginx-light`), in its own directory and process group,
//! stopped (master and workers) on drop.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Nginx {
    child: Child,
}

impl Nginx {
    /// Writes `config` to `dir/nginx.conf`, starts nginx with `dir` as its prefix, and waits
    /// until it accepts connections on `listens_on`.
    pub async fn start(dir: &Path, config: &str, listens_on: SocketAddr) -> Nginx {
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config).unwrap();
        let log = std::fs::File::create(dir.join("nginx.stderr")).unwrap();
        use std::os::unix::process::CommandExt as _;
        let child = Command::new("nginx")
            // Its own process group, so stopping it stops the workers too.
            .process_group(0)
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("nginx is installed (apt-get install nginx-light)");
        let mut nginx = Nginx { child };
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(listens_on).await.is_err() {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                panic!(
                    "nginx exited ({status}): {}{}",
                    std::fs::read_to_string(dir.join("nginx.stderr")).unwrap_or_default(),
                    std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "nginx did not listen on {listens_on}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        nginx
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.wait();
    }
}
