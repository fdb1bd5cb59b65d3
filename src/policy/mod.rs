//! Per-class access policy that needs no Pingora types: rate limits (allowlists and in-flight
//! caps are a few lines in `proxy`).

pub mod ratelimit;
