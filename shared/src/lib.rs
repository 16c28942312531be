//! kms-shared: everything the daemon and its clients must agree on.
//!
//! - [`model`]: key types, states, the records clients see, the validation rules;
//! - [`protocol`]: requests, responses, events and error kinds;
//! - [`codec`]: the length-prefixed MessagePack frames;
//! - [`ciphertext`]: the `ncpkms:v{N}:` format (parse and format only, no crypto);
//! - [`paths`]: where the socket and the data live;
//! - [`secret`]: plaintexts and data keys, wiped when dropped;
//! - [`text`]: the daemon's free text made safe for a terminal;
//! - [`client`]: the async client library.
//!
//! What a program using the client needs is also here at the root, so that one `use`
//! line serves: `use kms_shared::{Client, ClientError, ConnectOptions, ErrorKind, …};`.

pub mod ciphertext;
pub mod client;
pub mod codec;
pub mod model;
pub mod paths;
pub mod protocol;
pub mod secret;
pub mod text;

pub use client::{Client, ClientError, ConnectOptions, Notification, connect_or_start};
pub use model::{KeyInfo, KeyState, KeyType, Protection, SignScheme, VersionInfo};
pub use protocol::{CiphertextItem, CreateKey, ErrorKind, EventKind, ItemOutcome, PlaintextItem};
pub use secret::Secret;
