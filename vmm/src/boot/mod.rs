//! Getting a guest to its first instruction: the CPL3 long-mode start for built-in guests and a
//! multiboot v1 loader for the QEMU reference guest.
pub mod longmode;
pub mod multiboot;
