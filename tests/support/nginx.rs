//! A real nginx process (Debian's `nginx-light`), in its own directory and process group,
//! stopped (master and workers) on drop. It runs in the foreground whatever its config says:
//! a daemonizing nginx calls `setsid()` and leaves the group that stopping it kills.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use regtee::local_process::LocalProcess;

pub struct Nginx {
    child: LocalProcess,
}

impl Nginx {
    /// Writes `config` to `dir/nginx.conf`, starts nginx with `dir` as its prefix, and waits
    /// until it accepts connections on `listens_on`.
    pub async fn start(dir: &Path, config: &str, listens_on: SocketAddr) -> Nginx {
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config).unwrap();
        let log = std::fs::File::create(dir.join("nginx.stderr")).unwrap();
        let mut command = Command::new("nginx");
        command
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child =
            LocalProcess::spawn(command).expect("nginx is installed (apt-get install nginx-light)");
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
