//! understudy-primary
