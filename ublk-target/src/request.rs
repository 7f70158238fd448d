//! Decoding ublk I/O descriptors into block requests.
//!
//! Pure functions, so every rule (ranges, alignment, unknown ops) is unit
//! tested without a kernel.

use crate::error::{Error, Result};
use libublk::sys;

/// One block request, as the backend sees it. Offsets and lengths are bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockRequest<'a> {
    /// Read `len` bytes at `offset`; deliver them through the completion
    /// ([`crate::Completion::read_buf`] or [`crate::Completion::complete_read`]).
    Read {
        /// Byte offset.
        offset: u64,
        /// Byte length (a multiple of the logical block size).
        len: u32,
    },
    /// Write `data` at `offset`. `data` is only valid during
    /// [`crate::BlockBackend::submit`]: copy it there, or keep the
    /// [`crate::Completion`] and read it again with
    /// [`crate::Completion::write_data`] until you complete.
    Write {
        /// Byte offset.
        offset: u64,
        /// The payload.
        data: &'a [u8],
        /// Forced unit access: complete only once durable (docs/semantics.md §4).
        fua: bool,
    },
    /// Make every write completed before this one durable.
    Flush,
    /// The range's contents are no longer needed.
    Discard {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
    /// Make the range read back as zeroes.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
        /// The kernel asked to keep the blocks allocated (REQ_NOUNMAP).
        no_unmap: bool,
    },
}

/// What kind of request a tag carries, without the borrowed payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decoded {
    Read { offset: u64, len: u32 },
    Write { offset: u64, len: u32, fua: bool },
    Flush,
    Discard { offset: u64, len: u64 },
    WriteZeroes { offset: u64, len: u64, no_unmap: bool },
}

/// The limits a request is checked against.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    /// Device size in bytes.
    pub size: u64,
    /// Logical block size in bytes (a power of two).
    pub logical_block_size: u32,
    /// Size of each tag's data buffer: the largest READ/WRITE.
    pub max_io_bytes: u32,
}

/// Decodes one `ublksrv_io_desc`. Never panics: anything odd is an error
/// that becomes a negative errno for this request only.
pub(crate) fn decode(iod: &sys::ublksrv_io_desc, geo: &Geometry) -> Result<Decoded> {
    let op = iod.op_flags & 0xff;
    let flags = iod.op_flags & !0xff;
    let offset = iod.start_sector.checked_mul(512);
    let len = u64::from(iod.nr_sectors) * 512;
    let data = |offset: Option<u64>| data_range(offset, len, geo);
    match op {
        sys::UBLK_IO_OP_READ => {
            let (offset, len) = data(offset)?;
            Ok(Decoded::Read { offset, len })
        }
        sys::UBLK_IO_OP_WRITE => {
            let (offset, len) = data(offset)?;
            let fua = flags & sys::UBLK_IO_F_FUA != 0;
            Ok(Decoded::Write { offset, len, fua })
        }
        sys::UBLK_IO_OP_FLUSH => Ok(Decoded::Flush),
        sys::UBLK_IO_OP_DISCARD => {
            let offset = check_range(offset, len, geo)?;
            Ok(Decoded::Discard { offset, len })
        }
        sys::UBLK_IO_OP_WRITE_ZEROES => {
            let offset = check_range(offset, len, geo)?;
            let no_unmap = flags & sys::UBLK_IO_F_NOUNMAP != 0;
            Ok(Decoded::WriteZeroes { offset, len, no_unmap })
        }
        _ => Err(Error::Unsupported { op }),
    }
}

/// A READ/WRITE range: in the device, aligned, and fitting the tag buffer.
fn data_range(offset: Option<u64>, len: u64, geo: &Geometry) -> Result<(u64, u32)> {
    let offset = check_range(offset, len, geo)?;
    if len == 0 || len > u64::from(geo.max_io_bytes) {
        return Err(out_of_range(offset, len, geo));
    }
    // The bound above keeps len within u32.
    Ok((offset, len as u32))
}

/// Checks that `[offset, offset+len)` lies inside the device on logical
/// block boundaries; returns the offset.
fn check_range(offset: Option<u64>, len: u64, geo: &Geometry) -> Result<u64> {
    let offset = offset.ok_or_else(|| out_of_range(u64::MAX, len, geo))?;
    let end = offset.checked_add(len);
    let lbs = u64::from(geo.logical_block_size);
    let aligned = offset.is_multiple_of(lbs) && len.is_multiple_of(lbs);
    match end {
        Some(end) if end <= geo.size && aligned => Ok(offset),
        _ => Err(out_of_range(offset, len, geo)),
    }
}

fn out_of_range(offset: u64, len: u64, geo: &Geometry) -> Error {
    Error::OutOfRange { offset, len, size: geo.size }
}

impl Decoded {
    /// Bytes the kernel expects as the successful result: READ and WRITE
    /// report the bytes transferred (a shorter count makes the driver
    /// requeue the rest), every other op reports 0.
    pub(crate) fn success_result(&self) -> i32 {
        match self {
            // len <= max_io_bytes <= 32 MiB, so it fits an i32.
            Decoded::Read { len, .. } | Decoded::Write { len, .. } => *len as i32,
            _ => 0,
        }
    }

    /// Length of the tag buffer the request uses (0 for data-less ops).
    pub(crate) fn buf_len(&self) -> usize {
        match self {
            Decoded::Read { len, .. } | Decoded::Write { len, .. } => *len as usize,
            _ => 0,
        }
    }

    pub(crate) fn is_read(&self) -> bool {
        matches!(self, Decoded::Read { .. })
    }

    pub(crate) fn is_write(&self) -> bool {
        matches!(self, Decoded::Write { .. })
    }

    /// The backend's view; `payload` is the WRITE data (ignored otherwise).
    pub(crate) fn to_request(self, payload: &[u8]) -> BlockRequest<'_> {
        match self {
            Decoded::Read { offset, len } => BlockRequest::Read { offset, len },
            Decoded::Write { offset, fua, .. } => BlockRequest::Write { offset, data: payload, fua },
            Decoded::Flush => BlockRequest::Flush,
            Decoded::Discard { offset, len } => BlockRequest::Discard { offset, len },
            Decoded::WriteZeroes { offset, len, no_unmap } => BlockRequest::WriteZeroes { offset, len, no_unmap },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GEO: Geometry = Geometry { size: 1 << 20, logical_block_size: 4096, max_io_bytes: 128 << 10 };

    fn iod(op: u32, flags: u32, sector: u64, sectors: u32) -> sys::ublksrv_io_desc {
        sys::ublksrv_io_desc { op_flags: op | flags, nr_sectors: sectors, start_sector: sector, addr: 0 }
    }

    #[test]
    fn decodes_read_and_write_with_fua() {
        let r = decode(&iod(sys::UBLK_IO_OP_READ, 0, 8, 16), &GEO).unwrap();
        assert_eq!(r, Decoded::Read { offset: 4096, len: 8192 });
        assert_eq!(r.success_result(), 8192);
        let fua = sys::UBLK_IO_F_FUA;
        let w = decode(&iod(sys::UBLK_IO_OP_WRITE, fua, 0, 8), &GEO).unwrap();
        assert_eq!(w, Decoded::Write { offset: 0, len: 4096, fua: true });
        let w = decode(&iod(sys::UBLK_IO_OP_WRITE, 0, 0, 8), &GEO).unwrap();
        assert!(matches!(w, Decoded::Write { fua: false, .. }));
    }

    #[test]
    fn decodes_flush_discard_write_zeroes() {
        let f = decode(&iod(sys::UBLK_IO_OP_FLUSH, 0, 0, 0), &GEO).unwrap();
        assert_eq!(f, Decoded::Flush);
        assert_eq!(f.success_result(), 0);
        let d = decode(&iod(sys::UBLK_IO_OP_DISCARD, 0, 8, 1024), &GEO).unwrap();
        assert_eq!(d, Decoded::Discard { offset: 4096, len: 512 << 10 });
        // Discards are not bounded by the data buffer, only by the device.
        assert!(decode(&iod(sys::UBLK_IO_OP_DISCARD, 0, 0, 2048), &GEO).is_ok());
        let nounmap = sys::UBLK_IO_F_NOUNMAP;
        let z = decode(&iod(sys::UBLK_IO_OP_WRITE_ZEROES, nounmap, 0, 8), &GEO).unwrap();
        assert!(matches!(z, Decoded::WriteZeroes { no_unmap: true, .. }));
    }

    #[test]
    fn unknown_ops_are_unsupported_not_panics() {
        for op in [
            sys::UBLK_IO_OP_WRITE_SAME,
            sys::UBLK_IO_OP_ZONE_OPEN,
            sys::UBLK_IO_OP_ZONE_APPEND,
            sys::UBLK_IO_OP_REPORT_ZONES,
            0xff,
        ] {
            let e = decode(&iod(op, 0, 0, 8), &GEO).unwrap_err();
            assert_eq!(e.to_errno(), -libc::EOPNOTSUPP, "op {op}");
        }
    }

    #[test]
    fn rejects_out_of_range_and_misaligned() {
        let size_sectors = GEO.size / 512;
        let past_end = iod(sys::UBLK_IO_OP_READ, 0, size_sectors - 8, 16);
        assert!(matches!(decode(&past_end, &GEO), Err(Error::OutOfRange { .. })));
        let misaligned = iod(sys::UBLK_IO_OP_WRITE, 0, 1, 8);
        assert!(decode(&misaligned, &GEO).is_err());
        let huge_sector = iod(sys::UBLK_IO_OP_READ, 0, u64::MAX / 256, 8);
        assert!(decode(&huge_sector, &GEO).is_err());
        let too_big = iod(sys::UBLK_IO_OP_READ, 0, 0, (GEO.max_io_bytes / 512) + 8);
        assert!(decode(&too_big, &GEO).is_err());
        let empty = iod(sys::UBLK_IO_OP_WRITE, 0, 0, 0);
        assert!(decode(&empty, &GEO).is_err());
        let discard_past = iod(sys::UBLK_IO_OP_DISCARD, 0, size_sectors, 8);
        assert!(decode(&discard_past, &GEO).is_err());
    }

    #[test]
    fn request_view_carries_the_payload() {
        let data = [7u8; 4096];
        let w = Decoded::Write { offset: 8192, len: 4096, fua: true };
        assert_eq!(w.to_request(&data), BlockRequest::Write { offset: 8192, data: &data, fua: true });
        assert_eq!(w.buf_len(), 4096);
        assert_eq!(Decoded::Flush.buf_len(), 0);
    }
}
