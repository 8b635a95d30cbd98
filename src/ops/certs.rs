//! `regtee certs generate`: a development CA and a server certificate for the HTTPS listener.
//!
//! Docker only trusts a registry whose certificate names the host clients type, so the server
//! certificate carries every `--host` as a SAN, and the CA is written where
//! `/etc/docker/certs.d/HOST/ca.crt` can point at it.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

/// The files written by [`generate`].
#[derive(Debug)]
pub struct GeneratedCerts {
    /// The CA certificate clients should trust.
    pub ca_cert: PathBuf,
    /// The CA's private key (keep it, or delete it once done issuing).
    pub ca_key: PathBuf,
    /// The server chain for `tls_cert`: leaf, then CA.
    pub server_cert: PathBuf,
    /// The server key for `tls_key`.
    pub server_key: PathBuf,
}

/// Why certificates could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    /// A host name that cannot be a SAN.
    #[error("`{0}` is not a valid host name or IP address for a certificate")]
    BadHost(String),
    /// Key or certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// Files could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Writes `ca.crt`, `ca.key`, `regtee.crt` and `regtee.key` into `out`.
///
/// `hosts` are the names and addresses clients use; `localhost` and `127.0.0.1` are added so the
/// same files work for local tests.
pub fn generate(
    hosts: &[String],
    out: &Path,
    valid_days: i64,
) -> Result<GeneratedCerts, CertsError> {
    let now = OffsetDateTime::now_utc();
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "regtee development CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params.not_before = now - Duration::days(1);
    ca_params.not_after = now + Duration::days(valid_days.max(1) + 1);
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;

    let mut names: Vec<String> = hosts.to_vec();
    for default in ["localhost", "127.0.0.1"] {
        if !names.iter().any(|h| h == default) {
            names.push(default.to_string());
        }
    }
    let mut params =
        CertificateParams::new(names.clone()).map_err(|_| CertsError::BadHost(names.join(", ")))?;
    params
        .distinguished_name
        .push(DnType::CommonName, names[0].clone());
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(valid_days.max(1));
    let server_key = KeyPair::generate()?;
    let issuer = Issuer::new(ca_params, ca_key);
    let server_cert = params.signed_by(&server_key, &issuer)?;

    std::fs::create_dir_all(out).map_err(|source| CertsError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    let files = GeneratedCerts {
        ca_cert: out.join("ca.crt"),
        ca_key: out.join("ca.key"),
        server_cert: out.join("regtee.crt"),
        server_key: out.join("regtee.key"),
    };
    write(&files.ca_cert, &ca_cert.pem(), false)?;
    write(&files.ca_key, &issuer.key().serialize_pem(), true)?;
    write(
        &files.server_cert,
        &format!("{}{}", server_cert.pem(), ca_cert.pem()),
        false,
    )?;
    write(&files.server_key, &server_key.serialize_pem(), true)?;
    Ok(files)
}

/// What to do with freshly generated files: the config lines, and the trust step for each Docker
/// host, for the HTTPS port the config at `config` listens on (5443 when it has none).
pub fn next_steps(files: &GeneratedCerts, hosts: &[String], config: &Path) -> String {
    let listen = crate::config::Config::load_for_queue_commands(config)
        .ok()
        .and_then(|c| c.proxy.tls.map(|t| t.listen));
    let (port, whence) = match listen {
        Some(addr) => (addr.port(), format!("tls_listen in {}", config.display())),
        None => (
            5443,
            "the usual tls_listen port: pass --config for yours".to_string(),
        ),
    };
    let host = hosts.first().map(String::as_str).unwrap_or("localhost");
    let mut out = format!(
        "wrote {}\nwrote {}\nwrote {} (trust this CA on clients)\nwrote {} (keep private)\n",
        files.server_cert.display(),
        files.server_key.display(),
        files.ca_cert.display(),
        files.ca_key.display()
    );
    out.push_str(&format!(
        "\nset in regtee.toml:\n  tls_listen = \"0.0.0.0:{port}\"\n  tls_cert = \"{}\"\n  tls_key = \"{}\"\n",
        files.server_cert.display(),
        files.server_key.display()
    ));
    out.push_str(&format!(
        "\ntrust it on each Docker host (port {port}: {whence}):\n  sudo mkdir -p /etc/docker/certs.d/{host}:{port} && sudo cp {} /etc/docker/certs.d/{host}:{port}/ca.crt\n",
        files.ca_cert.display()
    ));
    out
}

fn write(path: &Path, contents: &str, private: bool) -> Result<(), CertsError> {
    std::fs::write(path, contents).map_err(|source| CertsError::Write {
        path: path.to_path_buf(),
        source,
    })?;
    if private {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(
            |source| CertsError::Write {
                path: path.to_path_buf(),
                source,
            },
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_files_load_as_a_server_config() {
        let dir = tempfile::tempdir().unwrap();
        let files = generate(&["registry.example.com".into()], dir.path(), 30).unwrap();
        crate::tls::server_config(&files.server_cert, &files.server_key).unwrap();
        let chain = std::fs::read_to_string(&files.server_cert).unwrap();
        assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2);
    }

    #[test]
    fn next_steps_name_the_configured_https_port() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = vec!["registry.example.com".to_string()];
        let files = generate(&hosts, &dir.path().join("certs"), 30).unwrap();
        let config = dir.path().join("regtee.toml");
        std::fs::write(
            &config,
            "[proxy]\ntls_listen = \"0.0.0.0:8443\"\ntls_cert = \"certs/regtee.crt\"\ntls_key = \"certs/regtee.key\"\n[upstream]\nurl = \"https://h\"\n",
        )
        .unwrap();
        let steps = next_steps(&files, &hosts, &config);
        assert!(
            steps.contains("/etc/docker/certs.d/registry.example.com:8443/ca.crt"),
            "{steps}"
        );
        let steps = next_steps(&files, &hosts, &dir.path().join("absent.toml"));
        assert!(
            steps.contains("certs.d/registry.example.com:5443"),
            "{steps}"
        );
        assert!(steps.contains("pass --config"), "{steps}");
    }
}
