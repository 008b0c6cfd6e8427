//! Content ids: a blob is named by the BLAKE3 hash of its bytes (the `ContentId` of
//! `common.proto`), so any peer can check that the bytes it got are the bytes it asked for.

use std::fmt;
use std::str::FromStr;

use crate::v1;

/// The name of a blob: the 32-byte BLAKE3 hash (default, unkeyed) of its bytes, what `b3sum`
/// prints. Shown to people as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContentId([u8; 32]);

/// Why bytes or text are not a content id.
#[derive(Debug, thiserror::Error)]
pub enum ContentIdError {
    /// The text is not 64 hex digits.
    #[error("a content id is 64 hex digits: {0}")]
    Hex(#[from] blake3::HexError),
    /// The wire message does not hold exactly 32 bytes.
    #[error("a content id is 32 bytes, got {len}")]
    Length {
        /// How many bytes the message held.
        len: usize,
    },
}

impl ContentId {
    /// The id of `bytes`: their BLAKE3 hash.
    pub fn of(bytes: &[u8]) -> Self {
        Self::from(blake3::hash(bytes))
    }

    /// The id with these raw hash bytes (no hashing is done).
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw hash bytes, e.g. the DHT record key of the blob.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The wire form.
    pub fn to_proto(&self) -> v1::ContentId {
        v1::ContentId {
            blake3: self.0.to_vec(),
        }
    }
}

impl From<blake3::Hash> for ContentId {
    fn from(hash: blake3::Hash) -> Self {
        Self(*hash.as_bytes())
    }
}

impl TryFrom<&v1::ContentId> for ContentId {
    type Error = ContentIdError;

    fn try_from(id: &v1::ContentId) -> Result<Self, ContentIdError> {
        let bytes: [u8; 32] =
            id.blake3
                .as_slice()
                .try_into()
                .map_err(|_| ContentIdError::Length {
                    len: id.blake3.len(),
                })?;
        Ok(Self(bytes))
    }
}

impl FromStr for ContentId {
    type Err = ContentIdError;

    /// Parses 64 hex digits (either case, as people paste them).
    fn from_str(text: &str) -> Result<Self, ContentIdError> {
        Ok(Self::from(blake3::Hash::from_hex(text)?))
    }
}

impl fmt::Display for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(blake3::Hash::from_bytes(self.0).to_hex().as_str())
    }
}

impl fmt::Debug for ContentId {
    /// The first 8 hex digits: enough to tell ids apart in a log line without drowning it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex = blake3::Hash::from_bytes(self.0).to_hex();
        write!(f, "ContentId({}…)", &hex[..8])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // `b3sum` of the empty input and of "abc", from the BLAKE3 test vectors.
    const EMPTY: &str = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262";
    const ABC: &str = "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85";

    #[test]
    fn the_id_is_the_blake3_hash_shown_as_lowercase_hex() {
        assert_eq!(ContentId::of(b"").to_string(), EMPTY);
        assert_eq!(ContentId::of(b"abc").to_string(), ABC);
        assert_eq!(
            format!("{:?}", ContentId::of(b"abc")),
            "ContentId(6437b3ac…)"
        );
    }

    #[test]
    fn hex_parses_back_and_bad_text_is_a_clear_error() {
        let id = ContentId::of(b"abc");
        assert_eq!(ABC.parse::<ContentId>().unwrap(), id);
        assert_eq!(ABC.to_uppercase().parse::<ContentId>().unwrap(), id);
        let short = "abc".parse::<ContentId>().unwrap_err().to_string();
        assert!(
            short.contains("64 hex digits") && short.contains('3'),
            "{short}"
        );
        let bad = ABC.replace('6', "g").parse::<ContentId>().unwrap_err();
        assert!(bad.to_string().contains("'g'"), "{bad}");
    }

    #[test]
    fn the_wire_form_round_trips_and_only_32_bytes_are_an_id() {
        let id = ContentId::of(b"abc");
        assert_eq!(ContentId::try_from(&id.to_proto()).unwrap(), id);
        for len in [0, 31, 33] {
            let proto = v1::ContentId {
                blake3: vec![0; len],
            };
            match ContentId::try_from(&proto) {
                Err(ContentIdError::Length { len: got }) => assert_eq!(got, len),
                other => panic!("{len} bytes gave {other:?}"),
            }
        }
    }

    #[test]
    fn ids_order_by_their_bytes() {
        let low = ContentId::from_bytes([0; 32]);
        let high = ContentId::from_bytes([0xff; 32]);
        assert!(low < high);
        assert_eq!(high.as_bytes(), &[0xff; 32]);
    }
}
