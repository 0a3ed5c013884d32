//! LDAP on the wire: BER TLV reader, framing codec, envelope peek and the few
//! PDUs the proxy authors itself.

pub mod ber;
pub mod codec;
pub mod envelope;
pub mod io;
pub mod paging;
pub mod pdu;
pub mod rootdse;

pub use codec::{FrameCodec, FrameError, DEFAULT_MAX_PDU};
pub use envelope::{op, Envelope, EnvelopeError};
pub use io::{FrameReader, FrameWriter};
