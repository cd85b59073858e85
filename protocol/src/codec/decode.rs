//! The chunk decoder: one chunk's bytes in, verified records and data out. Pure and `Send`: run
//! one [`ChunkDecoder`] per worker thread.
//!
//! Order of checks, each before anything is allocated for the next: header fields against
//! [`Limits`]; the payload length against the declared record and compressed sizes (format 3,
//! whose records vary in size: against the smallest and largest the records could take); each
//! record (kind, reserved bytes, page index in range, `Ref` source in range and not the page
//! itself, `Zero` hash); that the records fill their section exactly; the number of data pages;
//! then decompression into a buffer of exactly `data_pages x 4096` bytes (so a zstd bomb fails
//! instead of growing), and blake3 of every `Full` page: compared with its record in formats 1
//! and 2, recorded as the page's hash in format 3 (checked through the image digest at commit).

use super::{
    as_page, chunk_format_allowed, format_carries_hashes, max_record_len, min_record_len,
    RecordKind, CHUNK_HEADER_LEN, MIN_CHUNK_FORMAT,
};
use crate::digest::{hash_page, PageHash, ZERO_PAGE_HASH};
use crate::limits::{Limits, PAGE_SIZE};
use crate::message::ChunkFrame;
use crate::wire::Reader;

/// Why a chunk was rejected. Nothing of a rejected chunk is applied.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The chunk ends inside `0`.
    #[error("chunk ends inside its {0}")]
    Truncated(&'static str),
    /// Unknown or disallowed chunk format.
    #[error("chunk format {format} is not accepted in a version {version} frame")]
    Format {
        /// Chunk format.
        format: u16,
        /// Frame version.
        version: u16,
    },
    /// A reserved field is not zero.
    #[error("reserved chunk field {0} is not zero")]
    Reserved(&'static str),
    /// A count is over its limit.
    #[error("chunk {field} of {value} is over the limit of {max}")]
    OverLimit {
        /// Which count.
        field: &'static str,
        /// What arrived.
        value: u64,
        /// The limit.
        max: u64,
    },
    /// The payload length disagrees with the header.
    #[error("chunk payload is {actual} bytes, its header implies {expected}")]
    Length {
        /// Implied by the header.
        expected: u64,
        /// Received.
        actual: u64,
    },
    /// Record `index` has an invalid kind.
    #[error("record {index} has invalid kind {kind}")]
    Kind {
        /// Record number in the chunk.
        index: u32,
        /// The kind byte.
        kind: u8,
    },
    /// A page index (or `Ref` source) outside the image.
    #[error("record {index} names page {page}, outside the image of {pages} pages")]
    PageOutOfRange {
        /// Record number.
        index: u32,
        /// The page.
        page: u32,
        /// Image size.
        pages: u64,
    },
    /// A `Ref` to itself.
    #[error("record {index}: page {page} refers to itself")]
    SelfRef {
        /// Record number.
        index: u32,
        /// The page.
        page: u32,
    },
    /// A malformed record (non-zero source outside `Ref`, wrong `Zero` hash).
    #[error("record {index} (page {page}) is malformed: {what}")]
    Record {
        /// Record number.
        index: u32,
        /// The page.
        page: u32,
        /// What is wrong.
        what: &'static str,
    },
    /// `data_pages` disagrees with the number of `Full` and `Delta` records.
    #[error("chunk declares {declared} data pages but has {actual} Full/Delta records")]
    DataPages {
        /// Declared.
        declared: u32,
        /// Counted.
        actual: u32,
    },
    /// zstd refused the data (corrupt, or larger than declared).
    #[error("chunk data does not decompress within {limit} bytes")]
    Decompress {
        /// Output limit.
        limit: usize,
        /// zstd's error.
        #[source]
        source: std::io::Error,
    },
    /// Decompressed to the wrong size.
    #[error("chunk data decompressed to {actual} bytes, expected {expected}")]
    DataSize {
        /// Expected.
        expected: usize,
        /// Got.
        actual: usize,
    },
    /// A `Full` page's blake3 differs from its record.
    #[error("page {page}: content does not match its blake3 hash")]
    Hash {
        /// The page.
        page: u32,
    },
    /// A chunk frame's epoch/seq disagree with its payload.
    #[error("chunk frame header disagrees with its payload")]
    FrameMismatch,
}

/// One verified record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodedRecord {
    /// Destination page.
    pub page: u32,
    /// Kind (`Zero`, `Full`, `Ref` or `Delta`).
    pub kind: RecordKind,
    /// `Ref` source page (0 otherwise).
    pub source: u32,
    /// blake3 of the page's new content, as the record carries it (formats 1 and 2) or as
    /// the decoder derived it (format 3: `Zero` and `Full`). `None` for format-3 `Delta` and
    /// `Ref` records, whose hashes [`crate::EpochAssembler::commit`] derives.
    pub hash: Option<PageHash>,
    /// For `Full`/`Delta`: index of its page in [`DecodedChunk::data`].
    pub slot: u32,
}

/// A decoded, verified chunk: the staging form of its pages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodedChunk {
    /// Chunk format it was encoded in.
    pub format: u16,
    /// Epoch.
    pub epoch: u64,
    /// Sequence number within the epoch.
    pub seq: u32,
    /// Records in chunk order.
    pub records: Vec<DecodedRecord>,
    /// Data pages (`Full` content, `Delta` XOR), `slot x 4096` each.
    pub data: Vec<u8>,
}

impl DecodedChunk {
    /// Data page `slot`.
    pub fn data_page(&self, slot: u32) -> Option<&[u8; PAGE_SIZE]> {
        let start = (slot as usize).checked_mul(PAGE_SIZE)?;
        as_page(self.data.get(start..)?)
    }
}

/// A reusable chunk decoder (owns a zstd context). One per worker thread.
pub struct ChunkDecoder {
    limits: Limits,
    image_pages: u64,
    zstd: Option<zstd::bulk::Decompressor<'static>>,
}

impl std::fmt::Debug for ChunkDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkDecoder")
            .field("limits", &self.limits)
            .field("image_pages", &self.image_pages)
            .finish()
    }
}

/// Decodes one chunk payload with a fresh decoder (see [`ChunkDecoder::decode`]).
pub fn decode_chunk(
    version: u16,
    payload: &[u8],
    image_pages: u64,
    limits: &Limits,
) -> Result<DecodedChunk, DecodeError> {
    ChunkDecoder::new(limits.clone(), image_pages).decode(version, payload)
}

fn over(field: &'static str, value: u64, max: u64) -> DecodeError {
    DecodeError::OverLimit { field, value, max }
}

impl ChunkDecoder {
    /// A decoder for an image of `image_pages` pages (page indices must be below it).
    pub fn new(limits: Limits, image_pages: u64) -> Self {
        ChunkDecoder {
            limits,
            image_pages: image_pages.min(u64::from(u32::MAX) + 1),
            zstd: None,
        }
    }

    /// Decodes a chunk frame received from a [`crate::FrameDecoder`].
    pub fn decode_frame(&mut self, frame: &ChunkFrame) -> Result<DecodedChunk, DecodeError> {
        let c = self.decode(frame.version, &frame.payload)?;
        if c.epoch != frame.epoch || c.seq != frame.seq {
            return Err(DecodeError::FrameMismatch);
        }
        Ok(c)
    }

    /// Decodes and verifies a chunk payload that arrived in a frame of protocol `version`.
    pub fn decode(&mut self, version: u16, payload: &[u8]) -> Result<DecodedChunk, DecodeError> {
        let l = &self.limits;
        let mut r = Reader::new(payload);
        let format = r.u16().ok_or(DecodeError::Truncated("header"))?;
        if !chunk_format_allowed(version, format) || format < MIN_CHUNK_FORMAT {
            return Err(DecodeError::Format { format, version });
        }
        let flags = r.u16().ok_or(DecodeError::Truncated("header"))?;
        let seq = r.u32().ok_or(DecodeError::Truncated("header"))?;
        let epoch = r.u64().ok_or(DecodeError::Truncated("header"))?;
        let count = r.u32().ok_or(DecodeError::Truncated("header"))?;
        let data_pages = r.u32().ok_or(DecodeError::Truncated("header"))?;
        let clen = r.u32().ok_or(DecodeError::Truncated("header"))?;
        let reserved = r.u32().ok_or(DecodeError::Truncated("header"))?;
        if flags != 0 {
            return Err(DecodeError::Reserved("flags"));
        }
        if reserved != 0 {
            return Err(DecodeError::Reserved("header"));
        }
        if seq >= l.max_chunks_per_epoch {
            return Err(over("seq", seq.into(), l.max_chunks_per_epoch.into()));
        }
        if count > l.max_chunk_records {
            return Err(over(
                "record count",
                count.into(),
                l.max_chunk_records.into(),
            ));
        }
        if data_pages > l.max_chunk_data_pages || data_pages > count {
            let max = l.max_chunk_data_pages.min(count);
            return Err(over("data page count", data_pages.into(), max.into()));
        }
        if (data_pages == 0) != (clen == 0) {
            return Err(DecodeError::Record {
                index: 0,
                page: 0,
                what: "compressed data present without data pages, or missing",
            });
        }
        // The records section: all between the header and the zstd frame. Fixed records
        // (formats 1, 2) must fill it exactly; format-3 records (5 or 9 bytes) must fit in it,
        // and are checked to fill it exactly once read.
        let actual = payload.len() as u64;
        let fixed = CHUNK_HEADER_LEN as u64 + u64::from(clen);
        let least = fixed + u64::from(count) * min_record_len(format) as u64;
        let most = fixed + u64::from(count) * max_record_len(format) as u64;
        if actual < least || actual > most {
            return Err(DecodeError::Length {
                expected: if actual < least { least } else { most },
                actual,
            });
        }
        let records_len = payload
            .len()
            .checked_sub(CHUNK_HEADER_LEN + clen as usize)
            .ok_or(DecodeError::Truncated("records"))?;
        let section = r
            .bytes(records_len)
            .ok_or(DecodeError::Truncated("records"))?;
        let mut rr = Reader::new(section);

        // Records. `count` is bounded by the limit and by the payload length checked above.
        let mut records = Vec::with_capacity(count as usize);
        let mut slots = 0u32;
        let carries_hashes = format_carries_hashes(format);
        for index in 0..count {
            let (page, kind_byte, res, source, hash, kind);
            if carries_hashes {
                page = rr.u32().ok_or(DecodeError::Truncated("records"))?;
                kind_byte = rr.u8().ok_or(DecodeError::Truncated("records"))?;
                res = rr.array::<3>().ok_or(DecodeError::Truncated("records"))?;
                source = rr.u32().ok_or(DecodeError::Truncated("records"))?;
                hash = Some(rr.array::<32>().ok_or(DecodeError::Truncated("records"))?);
                kind = RecordKind::from_wire(kind_byte, format).ok_or(DecodeError::Kind {
                    index,
                    kind: kind_byte,
                })?;
            } else {
                kind_byte = rr.u8().ok_or(DecodeError::Truncated("records"))?;
                kind = RecordKind::from_wire(kind_byte, format).ok_or(DecodeError::Kind {
                    index,
                    kind: kind_byte,
                })?;
                page = rr.u32().ok_or(DecodeError::Truncated("records"))?;
                source = if kind == RecordKind::Ref {
                    rr.u32().ok_or(DecodeError::Truncated("records"))?
                } else {
                    0
                };
                res = [0; 3];
                // Zero: the zero page's; Full: filled in after decompression; Delta and Ref:
                // derived at commit.
                hash = (kind == RecordKind::Zero).then_some(ZERO_PAGE_HASH);
            }
            if u64::from(page) >= self.image_pages {
                return Err(DecodeError::PageOutOfRange {
                    index,
                    page,
                    pages: self.image_pages,
                });
            }
            if res != [0; 3] {
                return Err(DecodeError::Reserved("record"));
            }
            match kind {
                RecordKind::Ref => {
                    if u64::from(source) >= self.image_pages {
                        return Err(DecodeError::PageOutOfRange {
                            index,
                            page: source,
                            pages: self.image_pages,
                        });
                    }
                    if source == page {
                        return Err(DecodeError::SelfRef { index, page });
                    }
                }
                _ if source != 0 => {
                    return Err(DecodeError::Record {
                        index,
                        page,
                        what: "source set on a record that is not a Ref",
                    })
                }
                RecordKind::Zero if hash != Some(ZERO_PAGE_HASH) => {
                    return Err(DecodeError::Record {
                        index,
                        page,
                        what: "Zero record without the zero page's hash",
                    })
                }
                _ => {}
            }
            let slot = if kind.has_data() {
                slots += 1;
                slots - 1
            } else {
                0
            };
            records.push(DecodedRecord {
                page,
                kind,
                source,
                hash,
                slot,
            });
        }
        if rr.remaining() != 0 {
            return Err(DecodeError::Length {
                expected: actual - rr.remaining() as u64,
                actual,
            });
        }
        if slots != data_pages {
            return Err(DecodeError::DataPages {
                declared: data_pages,
                actual: slots,
            });
        }

        // Data: bounded decompression into exactly data_pages pages.
        let want = data_pages as usize * PAGE_SIZE;
        let mut data = Vec::new();
        if want > 0 {
            let src = r.rest();
            data.reserve_exact(want);
            let z = match &mut self.zstd {
                Some(z) => z,
                None => self
                    .zstd
                    .insert(zstd::bulk::Decompressor::new().map_err(|source| {
                        DecodeError::Decompress {
                            limit: want,
                            source,
                        }
                    })?),
            };
            let n = z.decompress_to_buffer(src, &mut data).map_err(|source| {
                DecodeError::Decompress {
                    limit: want,
                    source,
                }
            })?;
            if n != want || data.len() != want {
                return Err(DecodeError::DataSize {
                    expected: want,
                    actual: n,
                });
            }
            for rec in records.iter_mut().filter(|r| r.kind == RecordKind::Full) {
                let start = rec.slot as usize * PAGE_SIZE;
                let page = data
                    .get(start..)
                    .and_then(as_page)
                    .ok_or(DecodeError::Truncated("data"))?;
                let computed = hash_page(page);
                match rec.hash {
                    Some(h) if h != computed => {
                        return Err(DecodeError::Hash { page: rec.page });
                    }
                    Some(_) => {}
                    None => rec.hash = Some(computed),
                }
            }
        }
        Ok(DecodedChunk {
            format,
            epoch,
            seq,
            records,
            data,
        })
    }
}
