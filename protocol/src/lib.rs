//! understudy-protocol
