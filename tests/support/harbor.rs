//! Harbor as its installer deploys it: Harbor's own nginx in front of the registry and the token
//! service, on HTTPS with a certificate from a private CA, or on plain HTTP.
//!
//! The nginx configuration follows goharbor/harbor's templates
//! (`make/photon/prepare/templates/nginx/nginx.https.conf.jinja` and `nginx.http.conf.jinja`),
//! rule for rule where regtee can tell the difference: `Host $http_host` and
//! `X-Forwarded-Proto $scheme` on `/v2/` and `/service/` (HTTPS), `$x_forwarded_proto` mapped from
//! the client's header or `$scheme` (HTTP), `X-Forwarded-Host` passed through untouched,
//! `proxy_pass` with a URI (so nginx normalises and decodes the path first), no buffering either
//! way, no body size limit, TLS 1.2 only with Harbor's cipher list, and the plain port of an HTTPS
//! Harbor answering `308 https://<host>$request_uri`. Harbor core sits between nginx and the
//! registry in a real Harbor; it forwards `Host` and the `X-Forwarded-*` headers unchanged, so the
//! registry sees what it sees here. The token realm is Harbor's external URL (`ext_endpoint`).

use super::nginx::Nginx;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use regtee::local_registry::free_port;

/// Which way Harbor's own nginx serves clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HarborScheme {
    /// `harbor.yml` with an `https:` section: TLS on one port, 308 on the plain one.
    Https,
    /// `harbor.yml` without it: plain HTTP.
    Http,
}

/// Harbor's nginx, started on free loopback ports; stopped on drop.
pub struct HarborFront {
    child: Option<Nginx>,
    dir: PathBuf,
    /// The port clients use (TLS for an HTTPS Harbor).
    pub port: u16,
    /// The plain port that redirects to HTTPS (HTTPS Harbor only).
    pub redirect_port: Option<u16>,
    pub scheme: HarborScheme,
    /// The CA that signed the server certificate (HTTPS Harbor only).
    pub ca_cert: Option<PathBuf>,
}

/// The address the front listens on; the external URL and the certificate name it.
pub const HOST: &str = "127.0.0.1";

/// The certificate an HTTPS Harbor serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HarborCertificate {
    /// A server certificate signed by a private CA, as Harbor's install guide makes it.
    SignedByCa,
    /// A self-signed CA certificate used as the server certificate: what
    /// `openssl req -x509 -newkey rsa:4096 -nodes -subj /CN=harbor ...` makes (CA:TRUE).
    SelfSignedCa,
}

/// Writes a self-signed CA certificate for `host` as `regtee.crt`/`regtee.key` (the names nginx
/// is configured with) and returns the certificate, which is also what a user would trust.
fn self_signed_ca(dir: &Path, host: &str) -> PathBuf {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    std::fs::create_dir_all(dir).unwrap();
    let mut params = CertificateParams::new(vec![host.to_string()]).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(dir.join("regtee.crt"), cert.pem()).unwrap();
    std::fs::write(dir.join("regtee.key"), key.serialize_pem()).unwrap();
    dir.join("regtee.crt")
}

impl HarborFront {
    /// Picks the ports; [`HarborFront::start`] needs the registry and the token service first,
    /// and they need the external URL, which needs the port.
    pub fn plan(dir: &Path, scheme: HarborScheme) -> HarborFront {
        HarborFront::plan_with(dir, scheme, HarborCertificate::SignedByCa)
    }

    pub fn plan_with(dir: &Path, scheme: HarborScheme, cert: HarborCertificate) -> HarborFront {
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        let certs = dir.join("certs");
        let ca_cert = (scheme == HarborScheme::Https).then(|| match cert {
            HarborCertificate::SignedByCa => {
                regtee::certs::generate(&[HOST.to_string()], &certs, 30)
                    .expect("certificates for Harbor's nginx")
                    .ca_cert
            }
            HarborCertificate::SelfSignedCa => self_signed_ca(&certs, HOST),
        });
        HarborFront {
            child: None,
            dir: dir.to_path_buf(),
            port: free_port().unwrap(),
            redirect_port: (scheme == HarborScheme::Https).then(|| free_port().unwrap()),
            scheme,
            ca_cert,
        }
    }

    /// Harbor's `ext_endpoint`: what clients type, and where its token realm lives.
    pub fn external_url(&self) -> String {
        match self.scheme {
            HarborScheme::Https => format!("https://{HOST}:{}", self.port),
            HarborScheme::Http => format!("http://{HOST}:{}", self.port),
        }
    }

    /// `host:port` as clients name the registry.
    pub fn host(&self) -> String {
        format!("{HOST}:{}", self.port)
    }

    /// Starts nginx in front of the registry and the token service and waits until it listens.
    pub async fn start(&mut self, registry: SocketAddr, token_service: SocketAddr) {
        let addr: SocketAddr = format!("{HOST}:{}", self.port).parse().unwrap();
        let config = self.config(registry, token_service);
        self.child = Some(Nginx::start(&self.dir, &config, addr).await);
    }

    /// Stops nginx, master and workers: Harbor is unreachable.
    pub fn stop(&mut self) {
        self.child = None;
    }

    /// What nginx logged about requests (`access.log`), for assertions on what reached Harbor.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }

    fn config(&self, registry: SocketAddr, token_service: SocketAddr) -> String {
        let d = self.dir.display();
        // Harbor's locations, in its order. `$proto` is `$scheme` (HTTPS template) or the map
        // of the client's header (HTTP template).
        let proto = match self.scheme {
            HarborScheme::Https => "$scheme",
            HarborScheme::Http => "$x_forwarded_proto",
        };
        let locations = format!(
            r#"
    location /c/ {{
      proxy_pass http://core/c/;
      proxy_set_header Host $host;
      proxy_set_header X-Real-IP $remote_addr;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto {proto};
      proxy_buffering off;
      proxy_request_buffering off;
    }}

    location /api/ {{
      proxy_pass http://core/api/;
      proxy_set_header Host $host;
      proxy_set_header X-Real-IP $remote_addr;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto {proto};
      proxy_buffering off;
      proxy_request_buffering off;
    }}

    location /v1/ {{
      return 404;
    }}

    location /v2/ {{
      proxy_pass http://registry/v2/;
      proxy_set_header Host $http_host;
      proxy_set_header X-Real-IP $remote_addr;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto {proto};
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_send_timeout 900;
      proxy_read_timeout 900;
    }}

    location /service/ {{
      proxy_pass http://core/service/;
      proxy_set_header Host {service_host};
      proxy_set_header X-Real-IP $remote_addr;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto {proto};
      proxy_buffering off;
      proxy_request_buffering off;
    }}

    location /service/notifications {{
      return 404;
    }}
"#,
            service_host = match self.scheme {
                HarborScheme::Https => "$http_host",
                HarborScheme::Http => "$host",
            },
        );
        let servers = match self.scheme {
            HarborScheme::Https => format!(
                r#"
  server {{
    listen {HOST}:{port} ssl;
    server_tokens off;
    ssl_certificate {d}/certs/regtee.crt;
    ssl_certificate_key {d}/certs/regtee.key;
    ssl_protocols TLSv1.2;
    ssl_ciphers '!aNULL:kECDH+AESGCM:ECDH+AESGCM:RSA+AESGCM:kECDH+AES:ECDH+AES:RSA+AES:';
    ssl_prefer_server_ciphers on;
    ssl_session_cache shared:SSL:10m;
    client_max_body_size 0;
    chunked_transfer_encoding on;
    add_header Strict-Transport-Security "max-age=31536000; includeSubdomains; preload";
    add_header X-Frame-Options DENY;
    add_header Content-Security-Policy "frame-ancestors 'none'";
{locations}
  }}
  server {{
    listen {HOST}:{redirect};
    return 308 https://{HOST}:{port}$request_uri;
  }}
"#,
                port = self.port,
                redirect = self.redirect_port.unwrap_or_default(),
            ),
            HarborScheme::Http => format!(
                r#"
  map $http_x_forwarded_proto $x_forwarded_proto {{
    default $http_x_forwarded_proto;
    ""      $scheme;
  }}
  server {{
    listen {HOST}:{port};
    server_tokens off;
    client_max_body_size 0;
    add_header X-Frame-Options DENY;
    add_header Content-Security-Policy "frame-ancestors 'none'";
{locations}
  }}
"#,
                port = self.port,
            ),
        };
        format!(
            r#"# Harbor's nginx (goharbor/harbor make/photon/prepare/templates/nginx/), for tests.
user root;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;

events {{
  worker_connections 1024;
  use epoll;
  multi_accept on;
}}

http {{
  client_body_temp_path {d}/tmp/client_body;
  proxy_temp_path {d}/tmp/proxy;
  fastcgi_temp_path {d}/tmp/fastcgi;
  uwsgi_temp_path {d}/tmp/uwsgi;
  scgi_temp_path {d}/tmp/scgi;
  tcp_nodelay on;
  proxy_http_version 1.1;
  access_log {d}/access.log;

  # Harbor core: here the token service answers /service/, /api/ and /c/ (404 where it has
  # nothing), and /v2/ goes to the registry as core would forward it.
  upstream core {{
    server {token_service};
  }}
  upstream registry {{
    server {registry};
  }}
{servers}
}}
"#
        )
    }
}

impl Drop for HarborFront {
    fn drop(&mut self) {
        self.stop();
    }
}
