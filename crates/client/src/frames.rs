//! Compressed frames: with `?encoding=br` (or `gzip`) a message above the
//! gateway's threshold arrives as a binary frame holding its compressed
//! JSON. Decoded here, synchronously, so frames keep their arrival order.

use std::io::Read;

/// What the client asks the gateway to compress with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    /// Brotli: the smallest frames (native clients).
    #[default]
    Brotli,
    Gzip,
    /// Plain text frames only.
    None,
}

impl Encoding {
    /// The `?encoding=` value; `None` for plain text.
    pub(crate) fn query(self) -> Option<&'static str> {
        match self {
            Encoding::Brotli => Some("br"),
            Encoding::Gzip => Some("gzip"),
            Encoding::None => None,
        }
    }

    /// The encoding `welcome` confirmed (`"br"`, `"gzip"`, `"none"`).
    pub(crate) fn from_welcome(name: &str) -> Option<Encoding> {
        match name {
            "br" => Some(Encoding::Brotli),
            "gzip" => Some(Encoding::Gzip),
            "none" => Some(Encoding::None),
            _ => None,
        }
    }
}

/// The JSON text of a binary frame.
pub(crate) fn decode(bytes: &[u8], encoding: Encoding) -> Result<String, String> {
    let mut text = String::new();
    let read = match encoding {
        Encoding::Brotli => brotli::Decompressor::new(bytes, 4096).read_to_string(&mut text),
        Encoding::Gzip => flate2::read::GzDecoder::new(bytes).read_to_string(&mut text),
        Encoding::None => return Err("a binary frame on a connection that asked for none".into()),
    };
    read.map(|_| text)
        .map_err(|e| format!("undecodable {encoding:?} frame: {e}"))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn decodes_what_the_gateway_compresses() {
        let json = r#"{"type":"change","room":"a","position":"1"}"#.repeat(20);
        let mut br = Vec::new();
        brotli::CompressorWriter::new(&mut br, 4096, 5, 22)
            .write_all(json.as_bytes())
            .unwrap();
        assert_eq!(decode(&br, Encoding::Brotli).unwrap(), json);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(json.as_bytes()).unwrap();
        assert_eq!(decode(&gz.finish().unwrap(), Encoding::Gzip).unwrap(), json);
        assert!(decode(b"not brotli at all", Encoding::Gzip).is_err());
    }
}
