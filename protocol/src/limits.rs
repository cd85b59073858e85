//! Bounds on everything read from the wire.
//!
//! Every length, count and page index a decoder reads is checked against a [`Limits`] value that
//! the caller chooses, *before* anything is allocated for it. The defaults suit the guests
//! Understudy runs (at most 4 GiB of memory) with room to spare.

/// Size of a guest page, the unit of the page codec.
pub const PAGE_SIZE: usize = 4096;

/// One guest page.
pub type Page = [u8; PAGE_SIZE];

/// Caller-chosen bounds for decoding. See each field for its default.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame payload accepted, in bytes (default 16 MiB).
    pub max_frame_len: u32,
    /// Largest guest memory accepted, in pages (default 2^22 pages = 16 GiB).
    pub max_image_pages: u64,
    /// Most memory regions in a layout (default 64).
    pub max_regions: u16,
    /// Most page records in one chunk (default 8192).
    pub max_chunk_records: u32,
    /// Most `Full` and `Delta` pages in one chunk, i.e. the bound on its decompressed size in
    /// pages (default 256 pages = 1 MiB; the encoder makes about 64).
    pub max_chunk_data_pages: u32,
    /// Most chunks in one epoch (default 2^20).
    pub max_chunks_per_epoch: u32,
    /// Largest VM state blob in a `Commit`, in bytes (default 8 MiB).
    pub max_state_len: u32,
    /// Longest text field (VM id, reasons), in bytes (default 1024).
    pub max_text_len: u16,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_len: 16 << 20,
            max_image_pages: 1 << 22,
            max_regions: 64,
            max_chunk_records: 8192,
            max_chunk_data_pages: 256,
            max_chunks_per_epoch: 1 << 20,
            max_state_len: 8 << 20,
            max_text_len: 1024,
        }
    }
}

impl Limits {
    /// Decompressed bytes one chunk may produce at most.
    pub fn max_chunk_data_bytes(&self) -> usize {
        (self.max_chunk_data_pages as usize).saturating_mul(PAGE_SIZE)
    }
}
