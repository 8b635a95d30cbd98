//! The error codes of the distribution spec ("Error Codes", `code-1` to `code-14`), plus the ones
//! distribution itself adds, as a type: decisions are made on these, never on their spelling.

use std::fmt;

/// An error code as registries send it in `{"errors":[{"code": ...}]}`. Codes this list does
/// not know are kept verbatim.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// `BLOB_UNKNOWN`: blob unknown to registry.
    BlobUnknown,
    /// `BLOB_UPLOAD_INVALID`: blob upload invalid.
    BlobUploadInvalid,
    /// `BLOB_UPLOAD_UNKNOWN`: blob upload unknown to registry.
    BlobUploadUnknown,
    /// `DIGEST_INVALID`: provided digest did not match uploaded content.
    DigestInvalid,
    /// `MANIFEST_BLOB_UNKNOWN`: manifest references a manifest or blob unknown to registry.
    ManifestBlobUnknown,
    /// `MANIFEST_INVALID`: manifest invalid.
    ManifestInvalid,
    /// `MANIFEST_UNKNOWN`: manifest unknown to registry.
    ManifestUnknown,
    /// `NAME_INVALID`: invalid repository name.
    NameInvalid,
    /// `NAME_UNKNOWN`: repository name not known to registry.
    NameUnknown,
    /// `SIZE_INVALID`: provided length did not match content length.
    SizeInvalid,
    /// `UNAUTHORIZED`: authentication required.
    Unauthorized,
    /// `DENIED`: requested access to the resource is denied.
    Denied,
    /// `UNSUPPORTED`: the operation is unsupported.
    Unsupported,
    /// `TOOMANYREQUESTS`: too many requests.
    TooManyRequests,
    /// `TAG_INVALID` (distribution): manifest tag did not match URI.
    TagInvalid,
    /// `UNAVAILABLE` (distribution): service unavailable.
    Unavailable,
    /// Any other code, as sent.
    Other(String),
}

const KNOWN: [(ErrorCode, &str); 16] = [
    (ErrorCode::BlobUnknown, "BLOB_UNKNOWN"),
    (ErrorCode::BlobUploadInvalid, "BLOB_UPLOAD_INVALID"),
    (ErrorCode::BlobUploadUnknown, "BLOB_UPLOAD_UNKNOWN"),
    (ErrorCode::DigestInvalid, "DIGEST_INVALID"),
    (ErrorCode::ManifestBlobUnknown, "MANIFEST_BLOB_UNKNOWN"),
    (ErrorCode::ManifestInvalid, "MANIFEST_INVALID"),
    (ErrorCode::ManifestUnknown, "MANIFEST_UNKNOWN"),
    (ErrorCode::NameInvalid, "NAME_INVALID"),
    (ErrorCode::NameUnknown, "NAME_UNKNOWN"),
    (ErrorCode::SizeInvalid, "SIZE_INVALID"),
    (ErrorCode::Unauthorized, "UNAUTHORIZED"),
    (ErrorCode::Denied, "DENIED"),
    (ErrorCode::Unsupported, "UNSUPPORTED"),
    (ErrorCode::TooManyRequests, "TOOMANYREQUESTS"),
    (ErrorCode::TagInvalid, "TAG_INVALID"),
    (ErrorCode::Unavailable, "UNAVAILABLE"),
];

impl ErrorCode {
    /// The code from its spelling (case as the spec writes it; others kept as they are).
    pub fn parse(code: &str) -> ErrorCode {
        KNOWN
            .iter()
            .find(|(_, s)| *s == code)
            .map(|(c, _)| c.clone())
            .unwrap_or_else(|| ErrorCode::Other(code.to_string()))
    }

    /// The spelling on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            ErrorCode::Other(s) => s,
            known => KNOWN
                .iter()
                .find(|(c, _)| c == known)
                .map(|(_, s)| *s)
                .unwrap_or(""),
        }
    }

    /// The registry lost (or never committed) content a manifest references: ensuring it again
    /// and retrying helps.
    pub(crate) fn is_missing_content(&self) -> bool {
        matches!(
            self,
            ErrorCode::ManifestBlobUnknown | ErrorCode::BlobUnknown
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_unknown_ones_are_kept() {
        for (code, text) in KNOWN {
            assert_eq!(ErrorCode::parse(text), code);
            assert_eq!(code.as_str(), text);
        }
        assert_eq!(
            ErrorCode::parse("NAMESPACE_UNKNOWN"),
            ErrorCode::Other("NAMESPACE_UNKNOWN".into())
        );
        assert_eq!(
            ErrorCode::parse("NAMESPACE_UNKNOWN").as_str(),
            "NAMESPACE_UNKNOWN"
        );
    }
}
