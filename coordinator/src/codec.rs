//! The one module that knows how coordinator records are encoded on disk: bincode 2.0.1
//! (pinned), through serde. bincode 3.0.0 is an empty release and the crate is unmaintained
//! (RUSTSEC-2025-0141), so swapping it for another format is a change to this file alone.
//!
//! Records are only ever read back by the coordinator that wrote them, but a damaged or
//! foreign database file must still give an error, never a panic or a huge allocation: every
//! decode has a size limit and refuses trailing bytes.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The largest record this codec encodes or decodes.
pub const MAX_RECORD_BYTES: usize = 16 << 20;

type Config = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_RECORD_BYTES>,
>;

fn config() -> Config {
    bincode::config::standard().with_limit::<MAX_RECORD_BYTES>()
}

/// Why a record could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The value could not be encoded (for instance it is over the size limit).
    #[error("cannot encode a {what} record: {message}")]
    Encode {
        /// The record's type.
        what: &'static str,
        /// bincode's reason.
        message: String,
    },
    /// The bytes are not a record of this type.
    #[error("a stored {what} record is damaged: {message}")]
    Decode {
        /// The record's type.
        what: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// Encodes `value`.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| CodecError::Encode {
        what: short_type_name::<T>(),
        message: e.to_string(),
    })
}

/// Decodes a whole record of type `T` from `bytes`.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let what = short_type_name::<T>();
    if bytes.len() > MAX_RECORD_BYTES {
        return Err(CodecError::Decode {
            what,
            message: format!(
                "{} bytes, over the limit of {MAX_RECORD_BYTES}",
                bytes.len()
            ),
        });
    }
    let (value, used) =
        bincode::serde::decode_from_slice(bytes, config()).map_err(|e| CodecError::Decode {
            what,
            message: e.to_string(),
        })?;
    if used != bytes.len() {
        return Err(CodecError::Decode {
            what,
            message: format!("{} trailing bytes", bytes.len() - used),
        });
    }
    Ok(value)
}

fn short_type_name<T>() -> &'static str {
    let full = std::any::type_name::<T>();
    full.rsplit("::").next().unwrap_or(full)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Sample {
        id: u64,
        name: String,
        hashes: Vec<[u8; 32]>,
        state: Option<bool>,
    }

    #[test]
    fn records_round_trip_and_damage_is_an_error() {
        let sample = Sample {
            id: 7,
            name: "shout".into(),
            hashes: vec![[3; 32], [9; 32]],
            state: Some(true),
        };
        let bytes = encode(&sample).unwrap();
        assert_eq!(decode::<Sample>(&bytes).unwrap(), sample);

        let mut longer = bytes.clone();
        longer.push(0);
        let err = decode::<Sample>(&longer).unwrap_err().to_string();
        assert!(err.contains("Sample") && err.contains("trailing"), "{err}");
        for cut in 0..bytes.len() {
            assert!(decode::<Sample>(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        // A length prefix claiming a huge string is refused, not allocated.
        let huge = [7u8, 0xfc, 0xff, 0xff, 0xff, 0x7f];
        assert!(decode::<Sample>(&huge).is_err());
    }
}
