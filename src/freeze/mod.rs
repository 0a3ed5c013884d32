//! The freeze: everything about Allow-Backup lives here.
//!
//! - [`settings`]: the `[freeze]` table of the configuration;
//! - [`dn`]: DN normalisation for suffix matching;
//! - [`backend`]: backends (suffix -> mode) and request classification
//!   (read / write / never held, and which backends);
//! - [`engine`]: the state machine (ON: authorise, drain, prepare; OFF:
//!   done, release; lease; holdUntilUnbind; status) and the gate
//!   ([`engine::Engine::admit`]) every request passes between "envelope read"
//!   and "sent upstream";
//! - [`participant`]: what a session shares with the engine (its in-flight
//!   table and bound DN);
//! - [`drivers`]: BACKUP_PREPARE and BACKUP_DONE on the server (`command`,
//!   `openldap`, `389ds`), each step under a deadline;
//! - [`state`]: the state file of what drivers changed and not yet undone;
//! - [`error`]: why ON, OFF or a status query failed ([`FreezeError`]),
//!   with the LDAP result code the proxy answers with;
//! - [`stats`]: what the engine counts for monitoring (read at scrape
//!   time by `crate::metrics`);
//! - [`status`]: the status as a typed value ([`Status`]), which the proxy
//!   encodes.
//!
//! The per-connection queues themselves live in the session
//! (`proxy::session`), which asks the engine whether each request may pass
//! and releases its queue, oldest first, when the engine's epoch changes.

pub mod backend;
pub mod discover;
pub mod dn;
pub mod drivers;
pub mod engine;
pub mod error;
pub mod participant;
pub mod settings;
pub mod state;
pub mod stats;
pub mod status;

pub use backend::{BackendMap, Class, Kind, Mode};
pub use discover::{Discover, ServerFacts};
pub use drivers::Driver;
pub use engine::{
    Carried, Control, CutLog, Engine, Granted, Requester, SessionHandle, SERVER_NOT_BACK,
};
pub use error::FreezeError;
pub use settings::{BindIsWrite, FreezeConfig};
pub use status::Status;
