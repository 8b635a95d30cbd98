//! Tokens signed as the harness's issuer signs them (ES256, an `x5c` chain to a CA) and as
//! Harbor's token service does (RS256 with the key of `root.crt`, named by `kid`; the key pair in
//! this folder is a test fixture made with `openssl req -x509 -newkey rsa:2048`).

use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, RSA_PKCS1_SHA256, RsaKeyPair,
};
use serde_json::json;

use super::*;

const HARBOR_KEY: &str = include_str!("test-harbor-key.pem");
const HARBOR_ROOT: &str = include_str!("test-harbor-root.crt");

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn now() -> SystemTime {
    SystemTime::now()
}

fn claims(repo: &str, actions: &[&str], exp_in: i64) -> serde_json::Value {
    let now = seconds(now()) as i64;
    json!({
        "iss": "harbor-token-issuer",
        "aud": "harbor-registry",
        "exp": now + exp_in,
        "nbf": now - 5,
        "iat": now,
        "access": [{"type": "repository", "name": repo, "actions": actions}],
    })
}

/// A CA and a signing certificate under it, as distribution's `rootcertbundle` and `x5c` use.
struct Es256 {
    ca_pem: String,
    leaf_der: Vec<u8>,
    key: EcdsaKeyPair,
}

fn es256() -> Es256 {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .signed_by(&leaf_key, &Issuer::new(ca_params, ca_key))
        .unwrap();
    let key = EcdsaKeyPair::from_pkcs8(
        &ECDSA_P256_SHA256_FIXED_SIGNING,
        &leaf_key.serialize_der(),
        &SystemRandom::new(),
    )
    .unwrap();
    Es256 {
        ca_pem: ca.pem(),
        leaf_der: leaf.der().to_vec(),
        key,
    }
}

impl Es256 {
    fn sign(&self, claims: &serde_json::Value) -> String {
        let header = json!({"typ": "JWT", "alg": "ES256", "x5c": [
            base64::engine::general_purpose::STANDARD.encode(&self.leaf_der)
        ]});
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let sig = self
            .key
            .sign(&SystemRandom::new(), input.as_bytes())
            .unwrap();
        format!("Bearer {input}.{}", b64(sig.as_ref()))
    }

    fn trust(&self, dir: &Path) -> TokenTrust {
        let path = dir.join("bundle.pem");
        std::fs::write(&path, &self.ca_pem).unwrap();
        TokenTrust::load(&path, "harbor-token-issuer", "harbor-registry").unwrap()
    }
}

fn pem_der(pem: &str) -> Vec<u8> {
    x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .next()
        .unwrap()
        .unwrap()
        .contents
}

/// Signs as Harbor's token service: RS256, `kid` the libtrust id of `root.crt`'s key.
fn harbor_sign(claims: &serde_json::Value, kid: &str) -> String {
    let key = RsaKeyPair::from_pkcs8(&pem_der(HARBOR_KEY)).unwrap();
    let header = json!({"typ": "JWT", "alg": "RS256", "kid": kid});
    let input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let mut sig = vec![0; key.public().modulus_len()];
    key.sign(
        &RSA_PKCS1_SHA256,
        &SystemRandom::new(),
        input.as_bytes(),
        &mut sig,
    )
    .unwrap();
    format!("Bearer {input}.{}", b64(&sig))
}

fn harbor_trust(dir: &Path) -> (TokenTrust, String) {
    let path = dir.join("root.crt");
    std::fs::write(&path, HARBOR_ROOT).unwrap();
    let trust = TokenTrust::load(&path, "harbor-token-issuer", "harbor-registry").unwrap();
    let der = pem_der(HARBOR_ROOT);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    let kid = libtrust_key_id(cert.public_key().raw);
    (trust, kid)
}

fn grants(v: &Verdict) -> bool {
    matches!(v, Verdict::Grants { .. })
}

#[test]
fn a_harbor_token_named_by_kid_grants_what_it_says() {
    let dir = tempfile::tempdir().unwrap();
    let (trust, kid) = harbor_trust(dir.path());
    assert_eq!(kid.len(), 59, "twelve groups of four, eleven colons: {kid}");
    let token = harbor_sign(&claims("library/app", &["pull"], 1800), &kid);
    assert!(grants(&trust.check(
        Some(&token),
        "library/app",
        "pull",
        now()
    )));
    assert_eq!(
        trust.check(Some(&token), "library/app", "push", now()),
        Verdict::Denies
    );
    assert_eq!(
        trust.check(Some(&token), "library/other", "pull", now()),
        Verdict::Denies
    );
    let star = harbor_sign(&claims("library/app", &["*"], 1800), &kid);
    assert!(grants(&trust.check(
        Some(&star),
        "library/app",
        "pull",
        now()
    )));
    let unknown = harbor_sign(&claims("library/app", &["pull"], 1800), "ABCD:EFGH");
    assert!(matches!(
        trust.check(Some(&unknown), "library/app", "pull", now()),
        Verdict::Invalid(_)
    ));
}

#[test]
fn an_x5c_chain_must_end_in_the_trusted_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let signer = es256();
    let trust = signer.trust(dir.path());
    let token = signer.sign(&claims("library/app", &["pull", "push"], 300));
    let Verdict::Grants { until } = trust.check(Some(&token), "library/app", "pull", now()) else {
        panic!("a token of the trusted CA grants")
    };
    assert!(until > now());
    let stranger = es256().sign(&claims("library/app", &["pull"], 300));
    assert!(matches!(
        trust.check(Some(&stranger), "library/app", "pull", now()),
        Verdict::Invalid(_)
    ));
}

#[test]
fn what_the_registry_would_refuse_is_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let signer = es256();
    let trust = signer.trust(dir.path());
    let invalid = |token: &str| {
        matches!(
            trust.check(Some(token), "library/app", "pull", now()),
            Verdict::Invalid(_)
        )
    };
    assert!(
        invalid(&signer.sign(&claims("library/app", &["pull"], -120))),
        "expired beyond the leeway"
    );
    assert!(
        !invalid(&signer.sign(&claims("library/app", &["pull"], -30))),
        "within the leeway"
    );
    let mut c = claims("library/app", &["pull"], 300);
    c["iss"] = json!("another-issuer");
    assert!(invalid(&signer.sign(&c)));
    let mut c = claims("library/app", &["pull"], 300);
    c["aud"] = json!(["another-registry"]);
    assert!(invalid(&signer.sign(&c)));
    let mut c = claims("library/app", &["pull"], 300);
    c["nbf"] = json!(seconds(now()) + 3600);
    assert!(invalid(&signer.sign(&c)));
    let good = signer.sign(&claims("library/app", &["pull"], 300));
    let tampered = good.replacen("eyJ", "eyK", 2);
    assert!(invalid(&tampered));
    let unsigned = format!(
        "Bearer {}.{}.",
        b64(br#"{"alg":"none"}"#),
        b64(claims("library/app", &["pull"], 300).to_string().as_bytes())
    );
    assert!(invalid(&unsigned));
    assert!(invalid("Basic dXNlcjpwYXNz"));
    assert_eq!(
        trust.check(None, "library/app", "pull", now()),
        Verdict::Invalid("no Bearer token".into())
    );
    assert!(invalid("Bearer not.a.jwt"));
    assert!(
        trust.accepts(Some(&good), now()),
        "any valid token passes /v2/"
    );
    assert!(!trust.accepts(Some(&tampered), now()));
    assert!(!trust.accepts(Some("Basic dXNlcjpwYXNz"), now()));
    assert!(!trust.accepts(None, now()));
}

#[test]
fn an_unverified_expiry_is_read_only_to_shorten() {
    let token = es256().sign(&claims("library/app", &["pull"], 300));
    let exp = unverified_expiry(&token).unwrap();
    assert!(exp > now() && exp < now() + Duration::from_secs(400));
    assert_eq!(unverified_expiry("Bearer garbage"), None);
}
