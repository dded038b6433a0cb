//! Shipping spooled events to the cloud over QUIC (quinn + rustls, TLS 1.3 only).
//!
//! [`quic`] builds the endpoint with the gateway's CA; [`shipper`] is the driver of the
//! protocol's [`actidash_shared::session::ClientSession`] over one bidirectional stream.

pub mod quic;
pub mod shipper;
