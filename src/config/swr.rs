//! Huawei SWR issues no registry password: its long-term login is computed from an access key
//! pair. Doing it when the config is read lets operators hand regtee the AK/SK they already
//! manage, and the rest of regtee sees an ordinary login.

use hmac::{KeyInit, Mac};

use super::{Credentials, Secret};

/// Huawei SWR long-term login: user `REGION@AK`, password = lowercase hex of HMAC-SHA256(SK, AK).
pub(super) fn swr_login(region: &str, access_key: &Secret, secret_key: &Secret) -> Credentials {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret_key.expose().as_bytes())
        .expect("HMAC accepts keys of any length");
    mac.update(access_key.expose().as_bytes());
    let password = hex::encode(mac.finalize().into_bytes());
    Credentials {
        username: format!("{region}@{}", access_key.expose()),
        password: Secret::new(password),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector was computed with the command from Huawei's SWR documentation:
    /// `printf "$AK" | openssl dgst -binary -sha256 -hmac "$SK" | od -An -vtx1 | sed 's/[ \n]//g' | sed 'N;s/\n//'`
    #[test]
    fn matches_the_documented_openssl_derivation() {
        let creds = swr_login(
            "cn-north-4",
            &Secret::new("QTWAOYTTINDUT2QVKYUC"),
            &Secret::new("MFyfvK41ba2giqM7Uio6PznpdUKGpownRZlmVmHc"),
        );
        assert_eq!(creds.username, "cn-north-4@QTWAOYTTINDUT2QVKYUC");
        assert_eq!(
            creds.password.expose(),
            "89aca1198a970e4360203d71cdaa80cfc13ecd55ee84409719e88162d139ef34"
        );
    }
}
