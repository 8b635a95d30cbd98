//! Content digests: parsing, computing, and verifying while bytes stream past.
//!
//! A mirror is only as good as its proof that the bytes on the target are Harbor's bytes, and that
//! proof must not cost a second pass over a multi-gigabyte layer. [`VerifyingBody`] hashes each
//! frame as it flows to the target and fails the stream if the result differs.

use std::fmt;
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use sha2::Digest as _;

use crate::body::BoxError;

/// A digest algorithm the OCI spec registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// `sha256`, what everyone uses.
    Sha256,
    /// `sha512`, allowed by the spec.
    Sha512,
}

impl Algorithm {
    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }
}

/// `algorithm:hex`, validated so it is safe to put in a URL path or a database key.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

impl TryFrom<String> for Digest {
    type Error = DigestParseError;
    fn try_from(s: String) -> Result<Digest, DigestParseError> {
        s.parse()
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}

/// Text that is not a digest regtee can verify.
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a digest (expected sha256:<64 hex> or sha512:<128 hex>)")]
pub struct DigestParseError(pub String);

impl Digest {
    /// The algorithm part.
    pub(crate) fn algorithm(&self) -> Algorithm {
        if self.0.starts_with("sha512:") {
            Algorithm::Sha512
        } else {
            Algorithm::Sha256
        }
    }

    /// The hex part, lower case.
    pub fn hex(&self) -> &str {
        self.0.split_once(':').map(|(_, h)| h).unwrap_or("")
    }

    /// The whole `algorithm:hex` string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The sha256 digest of a byte string.
    pub fn sha256_of(bytes: &[u8]) -> Digest {
        Digest(format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(bytes))
        ))
    }

    /// The digest of a byte string with `algorithm`.
    pub fn of(algorithm: Algorithm, bytes: &[u8]) -> Digest {
        let mut hasher = Hasher::new(algorithm);
        hasher.update(bytes);
        hasher.finish()
    }

    /// Whether `other` names different content. Digests of two algorithms cannot be compared
    /// (distribution answers a `sha512:` upload with its canonical `sha256:` digest), so only
    /// two of one algorithm can contradict each other.
    pub(crate) fn contradicts(&self, other: &Digest) -> bool {
        self.algorithm() == other.algorithm() && self != other
    }

    /// The `Docker-Content-Digest` a registry reported, when present and valid.
    pub(crate) fn from_headers(headers: &http::HeaderMap) -> Option<Digest> {
        headers
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    }
}

impl FromStr for Digest {
    type Err = DigestParseError;

    fn from_str(s: &str) -> Result<Digest, DigestParseError> {
        let bad = || DigestParseError(s.chars().take(200).collect());
        let (alg, hex) = s.split_once(':').ok_or_else(bad)?;
        let algorithm = match alg {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            _ => return Err(bad()),
        };
        let hex_ok = hex.len() == algorithm.hex_len()
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !hex_ok {
            return Err(bad());
        }
        Ok(Digest(s.to_string()))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An incremental hash for one algorithm.
pub enum Hasher {
    /// sha256 state.
    Sha256(sha2::Sha256),
    /// sha512 state.
    Sha512(sha2::Sha512),
}

impl Hasher {
    /// A fresh hasher for `algorithm`.
    pub fn new(algorithm: Algorithm) -> Hasher {
        match algorithm {
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }

    /// Adds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(bytes),
            Hasher::Sha512(h) => h.update(bytes),
        }
    }

    /// The digest of everything added.
    pub fn finish(self) -> Digest {
        let (alg, hex) = match self {
            Hasher::Sha256(h) => (Algorithm::Sha256, hex::encode(h.finalize())),
            Hasher::Sha512(h) => (Algorithm::Sha512, hex::encode(h.finalize())),
        };
        Digest(format!("{}:{hex}", alg.name()))
    }
}

/// Bytes that did not hash to what they claimed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum VerifyError {
    /// The content hashed to something else.
    #[error("content digest mismatch: expected {expected}, got {actual}")]
    Mismatch {
        /// The digest the content was fetched by.
        expected: Digest,
        /// What the bytes hashed to.
        actual: Digest,
    },
    /// The stream ended early or ran long.
    #[error("content length mismatch: expected {expected} bytes, got {actual}")]
    Length {
        /// The size the descriptor promised.
        expected: u64,
        /// What arrived.
        actual: u64,
    },
}

/// Passes a body through, hashing it, and turns its end into an error if the digest differs.
///
/// hyper stops polling once `is_end_stream()` is true, so the check runs as soon as the inner
/// body reports its end, not only on `Poll::Ready(None)`.
pub(crate) struct VerifyingBody<B> {
    inner: B,
    expected: Digest,
    expected_len: Option<u64>,
    seen: u64,
    hasher: Option<Hasher>,
}

impl<B> VerifyingBody<B> {
    /// Wraps `inner`, which must hash to `expected` (and be `expected_len` bytes when given).
    pub(crate) fn new(inner: B, expected: Digest, expected_len: Option<u64>) -> Self {
        let hasher = Some(Hasher::new(expected.algorithm()));
        VerifyingBody {
            inner,
            expected,
            expected_len,
            seen: 0,
            hasher,
        }
    }

    fn verdict(&mut self) -> Result<(), VerifyError> {
        let Some(hasher) = self.hasher.take() else {
            return Ok(());
        };
        if let Some(expected) = self.expected_len
            && expected != self.seen
        {
            return Err(VerifyError::Length {
                expected,
                actual: self.seen,
            });
        }
        let actual = hasher.finish();
        if actual != self.expected {
            return Err(VerifyError::Mismatch {
                expected: self.expected.clone(),
                actual,
            });
        }
        Ok(())
    }
}

impl<B> Body for VerifyingBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    if let Some(h) = this.hasher.as_mut() {
                        h.update(data);
                    }
                    if this.expected_len.is_some_and(|n| this.seen > n) {
                        return Poll::Ready(Some(Err(this.verdict().unwrap_err().into())));
                    }
                }
                if this.inner.is_end_stream()
                    && let Err(e) = this.verdict()
                {
                    return Poll::Ready(Some(Err(e.into())));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => match this.verdict() {
                Ok(()) => Poll::Ready(None),
                Err(e) => Poll::Ready(Some(Err(e.into()))),
            },
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        // Report the end only once the verdict has been delivered through poll_frame.
        self.hasher.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    #[test]
    fn parses_and_rejects() {
        let d: Digest = format!("sha256:{}", "a".repeat(64)).parse().unwrap();
        assert_eq!(d.hex(), "a".repeat(64));
        assert!("sha256:abc".parse::<Digest>().is_err());
        assert!(
            format!("sha256:{}", "A".repeat(64))
                .parse::<Digest>()
                .is_err()
        );
        assert!(format!("md5:{}", "a".repeat(32)).parse::<Digest>().is_err());
        assert!(
            format!("sha512:{}", "0".repeat(128))
                .parse::<Digest>()
                .is_ok()
        );
        assert!("latest".parse::<Digest>().is_err());
    }

    #[test]
    fn sha256_of_empty_is_the_well_known_value() {
        assert_eq!(
            Digest::sha256_of(b"").as_str(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[tokio::test]
    async fn verifying_body_passes_good_bytes_and_fails_bad_ones() {
        let data = Bytes::from_static(b"hello layer");
        let good = VerifyingBody::new(Full::new(data.clone()), Digest::sha256_of(&data), None);
        assert_eq!(good.collect().await.unwrap().to_bytes(), data);

        let bad = VerifyingBody::new(Full::new(data.clone()), Digest::sha256_of(b"other"), None);
        let err = bad.collect().await.unwrap_err();
        assert!(err.to_string().contains("mismatch"), "{err}");

        let short = VerifyingBody::new(Full::new(data.clone()), Digest::sha256_of(&data), Some(99));
        assert!(short.collect().await.is_err());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(crate::arbitrary::CASES))]

            #[test]
            fn parsed_digests_are_safe_and_round_trip(text in "(sha256|sha512|md5|)[:]?[0-9a-fA-F]{0,130}|.{0,20}") {
                if let Ok(d) = text.parse::<Digest>() {
                    prop_assert_eq!(d.as_str(), text.as_str());
                    prop_assert!(d.hex().bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
                }
            }
        }
    }
}
