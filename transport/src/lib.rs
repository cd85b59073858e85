//! understudy-transport
