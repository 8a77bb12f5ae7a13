//! The PROXY protocol v1/v2 header reader, on arbitrary bytes and on headers built with `ppp`.
//! Never panics; never reads past the header; returns exactly the source address it carries.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use kaproxy::downstream::proxy_protocol::read_proxy_header;
use libfuzzer_sys::fuzz_target;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::OnceLock;

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    })
}

/// What `read_proxy_header` made of `input`, and the bytes it left unread.
fn read(input: &[u8]) -> (Result<Option<SocketAddr>, String>, &[u8]) {
    let mut rest = input;
    let res = runtime().block_on(read_proxy_header(&mut rest));
    (res.map_err(|e| e.to_string()), rest)
}

#[derive(Debug, Arbitrary)]
struct Built {
    v6: bool,
    src: [u8; 16],
    dst: [u8; 16],
    src_port: u16,
    dst_port: u16,
    tlvs: Vec<(u8, Vec<u8>)>,
    after: Vec<u8>,
}

impl Built {
    fn addrs(&self) -> (SocketAddr, SocketAddr) {
        let ip = |b: &[u8; 16]| -> IpAddr {
            if self.v6 {
                Ipv6Addr::from(*b).into()
            } else {
                Ipv4Addr::new(b[0], b[1], b[2], b[3]).into()
            }
        };
        (
            SocketAddr::new(ip(&self.src), self.src_port),
            SocketAddr::new(ip(&self.dst), self.dst_port),
        )
    }
}

fn built_v1(b: &Built) {
    let (src, dst) = b.addrs();
    let header = ppp::v1::Addresses::from((src, dst)).to_string();
    let mut input = header.clone().into_bytes();
    input.extend_from_slice(&b.after);
    let (res, rest) = read(&input);
    assert_eq!(res, Ok(Some(src)), "{header:?}");
    assert_eq!(rest, &b.after[..], "{header:?}");
}

fn built_v2(b: &Built) {
    let (src, dst) = b.addrs();
    let mut builder = ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (src, dst),
    );
    for (kind, value) in b.tlvs.iter().take(8) {
        let value = &value[..value.len().min(512)];
        builder = match builder.write_tlv(*kind, value) {
            Ok(b) => b,
            Err(_) => return,
        };
    }
    let Ok(header) = builder.build() else { return };
    let mut input = header.clone();
    input.extend_from_slice(&b.after);
    let (res, rest) = read(&input);
    assert_eq!(res, Ok(Some(src)), "{header:?}");
    assert_eq!(rest, &b.after[..], "{header:?}");
}

fn raw(input: &[u8]) {
    let (res, rest) = read(input);
    let consumed = input.len() - rest.len();
    let header = &input[..consumed];
    // What ppp makes of the same bytes when it is handed all of them. For v1 only a header
    // that ppp ends at a CRLF counts: ppp cuts the line at its first CR, so it also accepts
    // "PROXY UNKNOWN x \n\rX", a line that has not ended yet (kaproxy reads on to the CRLF).
    let reference: Option<(Option<SocketAddr>, usize)> = if input.starts_with(V2_SIGNATURE) {
        ppp::v2::Header::try_from(input).ok().map(|h| {
            let addr = if h.command == ppp::v2::Command::Local {
                None
            } else {
                match h.addresses {
                    ppp::v2::Addresses::IPv4(a) => Some((a.source_address, a.source_port).into()),
                    ppp::v2::Addresses::IPv6(a) => Some((a.source_address, a.source_port).into()),
                    _ => None,
                }
            };
            (addr, h.len())
        })
    } else {
        ppp::v1::Header::try_from(input)
            .ok()
            .filter(|h| h.header.ends_with("\r\n"))
            .map(|h| {
                let addr = match h.addresses {
                    ppp::v1::Addresses::Tcp4(a) => Some((a.source_address, a.source_port).into()),
                    ppp::v1::Addresses::Tcp6(a) => Some((a.source_address, a.source_port).into()),
                    ppp::v1::Addresses::Unknown => None,
                };
                (addr, h.header.len())
            })
    };
    match res {
        Ok(addr) if header.starts_with(V2_SIGNATURE) => {
            // One whole v2 block, and ppp agrees on its length and address.
            assert_eq!(reference, Some((addr, consumed)), "input {input:?}");
        }
        Ok(addr) => {
            // One v1 line: it ends at its first CRLF (never past it), within 107 bytes, and
            // ppp reads the same address from it.
            assert!(header.starts_with(b"PROXY "), "{header:?}");
            let first_crlf = header.windows(2).position(|w| w == b"\r\n");
            assert_eq!(first_crlf, Some(consumed - 2), "input {input:?}");
            assert!(consumed <= 107, "v1 header of {consumed} bytes");
            let h = ppp::v1::Header::try_from(header).expect("ppp accepts what kaproxy accepted");
            let ppp_addr: Option<SocketAddr> = match h.addresses {
                ppp::v1::Addresses::Tcp4(a) => Some((a.source_address, a.source_port).into()),
                ppp::v1::Addresses::Tcp6(a) => Some((a.source_address, a.source_port).into()),
                ppp::v1::Addresses::Unknown => None,
            };
            assert_eq!(addr, ppp_addr, "input {input:?}");
            // A well-formed header (ppp stops at a CRLF) is consumed exactly.
            if let Some((_, n)) = reference {
                assert_eq!(n, consumed, "input {input:?}");
            }
        }
        Err(e) => {
            // Rejected: ppp rejects it too.
            assert!(
                reference.is_none(),
                "kaproxy rejected {input:?} ({e}) that ppp reads as {reference:?}"
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 | 1 => raw(rest),
        m => {
            let Ok(b) = Built::arbitrary(&mut Unstructured::new(rest)) else {
                return;
            };
            if m == 2 {
                built_v1(&b)
            } else {
                built_v2(&b)
            }
        }
    }
});
