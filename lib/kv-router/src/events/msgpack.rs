//! The few msgpack primitives the event codec needs: a bounds-checked reader
//! over a byte slice and a writer into a `Vec<u8>`. Written by hand so that
//! every malformed input is a typed error at a known offset (never a panic
//! or an allocation sized by untrusted input); must not grow into a general
//! msgpack library.

use super::decode::DecodeError;

/// How deep [`Reader::skip`] follows nested containers before refusing:
/// events are at most three levels deep, so anything deeper is hostile.
const MAX_DEPTH: usize = 32;

/// What a msgpack value is, as far as the decoder cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Nil,
    Bool,
    Int,
    Float,
    Str,
    Bin,
    Array,
    Map,
    Ext,
    Reserved,
}

impl Kind {
    pub(crate) fn of(marker: u8) -> Kind {
        match marker {
            0x00..=0x7f | 0xe0..=0xff | 0xcc..=0xd3 => Kind::Int,
            0x80..=0x8f | 0xde | 0xdf => Kind::Map,
            0x90..=0x9f | 0xdc | 0xdd => Kind::Array,
            0xa0..=0xbf | 0xd9..=0xdb => Kind::Str,
            0xc0 => Kind::Nil,
            0xc2 | 0xc3 => Kind::Bool,
            0xc4..=0xc6 => Kind::Bin,
            0xca | 0xcb => Kind::Float,
            0xc7..=0xc9 | 0xd4..=0xd8 => Kind::Ext,
            0xc1 => Kind::Reserved,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Nil => "nil",
            Kind::Bool => "bool",
            Kind::Int => "int",
            Kind::Float => "float",
            Kind::Str => "str",
            Kind::Bin => "bin",
            Kind::Array => "array",
            Kind::Map => "map",
            Kind::Ext => "ext",
            Kind::Reserved => "reserved marker 0xc1",
        }
    }
}

/// An integer as msgpack carries it: unsigned or negative.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Int {
    U(u64),
    I(i64),
}

/// A cursor over one payload.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub(crate) fn offset(&self) -> usize {
        self.pos
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn peek_kind(&self) -> Result<Kind, DecodeError> {
        self.buf
            .get(self.pos)
            .map(|m| Kind::of(*m))
            .ok_or(DecodeError::Truncated { offset: self.pos })
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|end| *end <= self.buf.len())
            .ok_or(DecodeError::Truncated { offset: self.pos })?;
        let bytes = &self.buf[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn byte(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn be(&mut self, n: usize) -> Result<u64, DecodeError> {
        Ok(self.take(n)?.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }

    fn unexpected(&self, offset: usize, expected: &'static str, marker: u8) -> DecodeError {
        DecodeError::UnexpectedType {
            offset,
            expected,
            found: Kind::of(marker).name(),
        }
    }

    /// Consumes a nil if one is next; true when it did.
    pub(crate) fn nil(&mut self) -> Result<bool, DecodeError> {
        if self.peek_kind()? == Kind::Nil {
            self.pos += 1;
            return Ok(true);
        }
        Ok(false)
    }

    pub(crate) fn array_len(&mut self) -> Result<usize, DecodeError> {
        let at = self.pos;
        let marker = self.byte()?;
        let len = match marker {
            0x90..=0x9f => usize::from(marker & 0x0f),
            0xdc => self.be(2)? as usize,
            0xdd => self.be(4)? as usize,
            _ => return Err(self.unexpected(at, "array", marker)),
        };
        Ok(len)
    }

    pub(crate) fn map_len(&mut self) -> Result<usize, DecodeError> {
        let at = self.pos;
        let marker = self.byte()?;
        match marker {
            0x80..=0x8f => Ok(usize::from(marker & 0x0f)),
            0xde => Ok(self.be(2)? as usize),
            0xdf => Ok(self.be(4)? as usize),
            _ => Err(self.unexpected(at, "map", marker)),
        }
    }

    pub(crate) fn str(&mut self) -> Result<&'a str, DecodeError> {
        let at = self.pos;
        let marker = self.byte()?;
        let len = match marker {
            0xa0..=0xbf => usize::from(marker & 0x1f),
            0xd9 => self.be(1)? as usize,
            0xda => self.be(2)? as usize,
            0xdb => self.be(4)? as usize,
            _ => return Err(self.unexpected(at, "str", marker)),
        };
        std::str::from_utf8(self.take(len)?).map_err(|source| DecodeError::InvalidUtf8 { offset: at, source })
    }

    /// Raw bytes of a bin value.
    pub(crate) fn bin(&mut self) -> Result<&'a [u8], DecodeError> {
        let at = self.pos;
        let marker = self.byte()?;
        let len = match marker {
            0xc4 => self.be(1)? as usize,
            0xc5 => self.be(2)? as usize,
            0xc6 => self.be(4)? as usize,
            _ => return Err(self.unexpected(at, "bin", marker)),
        };
        self.take(len)
    }

    pub(crate) fn int(&mut self) -> Result<Int, DecodeError> {
        let at = self.pos;
        let marker = self.byte()?;
        Ok(match marker {
            0x00..=0x7f => Int::U(u64::from(marker)),
            0xe0..=0xff => Int::I(i64::from(marker as i8)),
            0xcc => Int::U(self.be(1)?),
            0xcd => Int::U(self.be(2)?),
            0xce => Int::U(self.be(4)?),
            0xcf => Int::U(self.be(8)?),
            0xd0 => Int::I(i64::from(self.be(1)? as u8 as i8)),
            0xd1 => Int::I(i64::from(self.be(2)? as u16 as i16)),
            0xd2 => Int::I(i64::from(self.be(4)? as u32 as i32)),
            0xd3 => Int::I(self.be(8)? as i64),
            _ => return Err(self.unexpected(at, "int", marker)),
        })
    }

    /// A float, or an int read as a float (some encoders shrink whole numbers).
    pub(crate) fn float(&mut self) -> Result<f64, DecodeError> {
        let at = self.pos;
        match self.buf.get(at).copied() {
            Some(0xca) => {
                self.pos += 1;
                Ok(f64::from(f32::from_bits(self.be(4)? as u32)))
            }
            Some(0xcb) => {
                self.pos += 1;
                Ok(f64::from_bits(self.be(8)?))
            }
            Some(_) if self.peek_kind()? == Kind::Int => Ok(match self.int()? {
                Int::U(u) => u as f64,
                Int::I(i) => i as f64,
            }),
            Some(marker) => Err(self.unexpected(at, "float", marker)),
            None => Err(DecodeError::Truncated { offset: at }),
        }
    }

    /// Skips one value of any kind, nested containers included.
    pub(crate) fn skip(&mut self) -> Result<(), DecodeError> {
        self.skip_at_depth(0)
    }

    fn skip_at_depth(&mut self, depth: usize) -> Result<(), DecodeError> {
        if depth > MAX_DEPTH {
            return Err(DecodeError::TooDeep { offset: self.pos });
        }
        let at = self.pos;
        let marker = *self.buf.get(at).ok_or(DecodeError::Truncated { offset: at })?;
        match Kind::of(marker) {
            Kind::Nil | Kind::Bool => {
                self.pos += 1;
            }
            Kind::Int => {
                self.int()?;
            }
            Kind::Float => {
                self.float()?;
            }
            Kind::Str => {
                // Skipping must not fail on bytes that are not UTF-8.
                self.pos += 1;
                let len = match marker {
                    0xa0..=0xbf => usize::from(marker & 0x1f),
                    0xd9 => self.be(1)? as usize,
                    0xda => self.be(2)? as usize,
                    _ => self.be(4)? as usize,
                };
                self.take(len)?;
            }
            Kind::Bin => {
                self.bin()?;
            }
            Kind::Array => {
                for _ in 0..self.array_len()? {
                    self.skip_at_depth(depth + 1)?;
                }
            }
            Kind::Map => {
                for _ in 0..self.map_len()?.saturating_mul(2) {
                    self.skip_at_depth(depth + 1)?;
                }
            }
            Kind::Ext => {
                self.pos += 1;
                let len = match marker {
                    0xd4 => 1,
                    0xd5 => 2,
                    0xd6 => 4,
                    0xd7 => 8,
                    0xd8 => 16,
                    0xc7 => self.be(1)? as usize,
                    0xc8 => self.be(2)? as usize,
                    _ => self.be(4)? as usize,
                };
                self.take(1 + len)?; // the type byte, then the data
            }
            Kind::Reserved => return Err(self.unexpected(at, "a msgpack value", marker)),
        }
        Ok(())
    }
}

/// Appends msgpack values to a buffer.
#[derive(Debug, Default)]
pub(crate) struct Writer {
    pub(crate) buf: Vec<u8>,
}

impl Writer {
    pub(crate) fn array_len(&mut self, len: usize) {
        match len {
            0..=15 => self.buf.push(0x90 | len as u8),
            16..=0xffff => {
                self.buf.push(0xdc);
                self.buf.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                self.buf.push(0xdd);
                self.buf.extend_from_slice(&(len as u32).to_be_bytes());
            }
        }
    }

    pub(crate) fn nil(&mut self) {
        self.buf.push(0xc0);
    }

    pub(crate) fn str(&mut self, s: &str) {
        let len = s.len();
        match len {
            0..=31 => self.buf.push(0xa0 | len as u8),
            32..=0xff => self.buf.extend_from_slice(&[0xd9, len as u8]),
            0x100..=0xffff => {
                self.buf.push(0xda);
                self.buf.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                self.buf.push(0xdb);
                self.buf.extend_from_slice(&(len as u32).to_be_bytes());
            }
        }
        self.buf.extend_from_slice(s.as_bytes());
    }

    /// The smallest encoding of an unsigned int, as msgpack encoders write it.
    pub(crate) fn uint(&mut self, v: u64) {
        match v {
            0..=0x7f => self.buf.push(v as u8),
            0x80..=0xff => self.buf.extend_from_slice(&[0xcc, v as u8]),
            0x100..=0xffff => {
                self.buf.push(0xcd);
                self.buf.extend_from_slice(&(v as u16).to_be_bytes());
            }
            0x1_0000..=0xffff_ffff => {
                self.buf.push(0xce);
                self.buf.extend_from_slice(&(v as u32).to_be_bytes());
            }
            _ => {
                self.buf.push(0xcf);
                self.buf.extend_from_slice(&v.to_be_bytes());
            }
        }
    }

    /// The smallest encoding of a signed int.
    pub(crate) fn int(&mut self, v: i64) {
        if v >= 0 {
            return self.uint(v as u64);
        }
        match v {
            -32..=-1 => self.buf.push(v as i8 as u8),
            -128..=-33 => self.buf.extend_from_slice(&[0xd0, v as i8 as u8]),
            -32768..=-129 => {
                self.buf.push(0xd1);
                self.buf.extend_from_slice(&(v as i16).to_be_bytes());
            }
            -2147483648..=-32769 => {
                self.buf.push(0xd2);
                self.buf.extend_from_slice(&(v as i32).to_be_bytes());
            }
            _ => {
                self.buf.push(0xd3);
                self.buf.extend_from_slice(&v.to_be_bytes());
            }
        }
    }

    pub(crate) fn f64(&mut self, v: f64) {
        self.buf.push(0xcb);
        self.buf.extend_from_slice(&v.to_bits().to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ints_of_every_width_read_back() {
        for v in [
            0i64,
            1,
            127,
            128,
            255,
            256,
            65535,
            65536,
            u32::MAX as i64,
            i64::MAX,
            -1,
            -32,
            -33,
            -128,
            -129,
            -32768,
            -32769,
            i64::MIN,
        ] {
            let mut w = Writer::default();
            w.int(v);
            let mut r = Reader::new(&w.buf);
            let got = match r.int().unwrap() {
                Int::U(u) => u as i64,
                Int::I(i) => i,
            };
            assert_eq!(got, v);
            assert_eq!(r.remaining(), 0);
        }
    }

    #[test]
    fn a_truncated_int_is_an_error_not_a_panic() {
        let mut r = Reader::new(&[0xcf, 1, 2]);
        assert_eq!(r.int().unwrap_err(), DecodeError::Truncated { offset: 1 });
    }

    #[test]
    fn skip_refuses_hostile_nesting() {
        let bytes = vec![0x91u8; 100];
        assert!(matches!(Reader::new(&bytes).skip(), Err(DecodeError::TooDeep { .. })));
    }

    #[test]
    fn skip_passes_over_every_kind() {
        // [nil, true, 1.5f32, "ab", bin[1], {1: 2}, fixext1, -5]
        let bytes = [
            0x98, 0xc0, 0xc3, 0xca, 0x3f, 0xc0, 0, 0, 0xa2, b'a', b'b', 0xc4, 1, 9, 0x81, 1, 2, 0xd4, 1, 7, 0xfb,
        ];
        let mut r = Reader::new(&bytes);
        r.skip().unwrap();
        assert_eq!(r.remaining(), 0);
    }
}
