//! understudy-vmm
