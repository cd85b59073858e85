//! understudy-backup
