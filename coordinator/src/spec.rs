//! Job specs: the TOML people write, the protobuf the wire carries, and the checks both pass.
