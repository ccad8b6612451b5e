//! Codec costs: encoding and decoding typical frames in JSON (text frames) and postcard (binary
//! frames), and their size in bytes. Bodies are real dialog turns of the median (30 bytes) and
//! p99 (259 bytes) sizes of `assets/dialogs.jsonl`.
//!
//! `cargo bench --bench codec` (sizes are printed first, then criterion's timings).

use criterion::{black_box, criterion_group, BenchmarkId, Criterion, Throughput};
use parley::protocol::codec::{
    decode_request_json, decode_request_postcard, decode_server_json, decode_server_postcard, encode_request, encode_server,
};
use parley::protocol::{ClientFrame, Encoded, Encoding, EventPayload, MessageView, Request, ServerFrame};

/// A median-sized turn (30 bytes of UTF-8).
const SHORT: &str = "Hi, how is it going? I'm fine.";
/// A p99-sized turn, multi-byte (259 bytes of UTF-8).
const LONG: &str = "Пожалуйста, расскажите мне о себе. Я — программа, которая умеет разговаривать, \
                    и мне очень интересно, как проходит ваш день. Что вы сегодня делали";

fn frames() -> Vec<(&'static str, Request, ServerFrame)> {
    let mk = |name: &'static str, body: &str| {
        let req = Request {
            rid: None,
            frame: ClientFrame::Send { id: "1842.93318842".into(), to: "ldq3x9k2.17".into(), body: body.into() },
        };
        let ev = ServerFrame::Event {
            ev: 48_213,
            payload: EventPayload::Message(MessageView {
                conv: "dm:ldq3x9k2.16:ldq3x9k2.17".into(),
                seq: 24_107,
                id: "1842.93318842".into(),
                from: "ldq3x9k2.16".into(),
                body: body.into(),
                ts: 1_796_000_000_123,
            }),
        };
        (name, req, ev)
    };
    vec![mk("short", SHORT), mk("long", LONG)]
}

fn ack() -> ServerFrame {
    ServerFrame::Ack { rid: None, id: "1842.93318842".into(), conv: "dm:ldq3x9k2.16:ldq3x9k2.17".into(), seq: 24_107, ts: 1_796_000_000_123 }
}

fn bytes(e: &Encoded) -> Vec<u8> {
    match e {
        Encoded::Text(s) => s.as_bytes().to_vec(),
        Encoded::Binary(b) => b.to_vec(),
    }
}

/// Prints the bytes per frame of each encoding.
fn sizes() {
    println!("bytes per frame            json  postcard");
    for (name, req, ev) in frames() {
        let (j, p) = (encode_request(&req, Encoding::Json).len(), encode_request(&req, Encoding::Postcard).len());
        println!("send ({name:5})              {j:5}  {p:8}");
        let (j, p) = (encode_server(&ev, Encoding::Json).len(), encode_server(&ev, Encoding::Postcard).len());
        println!("event message ({name:5})     {j:5}  {p:8}");
    }
    let a = ack();
    println!("ack                        {:5}  {:8}", encode_server(&a, Encoding::Json).len(), encode_server(&a, Encoding::Postcard).len());
}

/// Benchmarks encoding and decoding one frame in both encodings.
fn both(c: &mut Criterion, group: &str, encode: impl Fn(Encoding) -> Encoded, decode: impl Fn(Encoding, &[u8]) -> bool) {
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Elements(1));
    for (en, enc) in [("json", Encoding::Json), ("postcard", Encoding::Postcard)] {
        g.bench_function(BenchmarkId::new("encode", en), |b| b.iter(|| encode(black_box(enc))));
        let wire = bytes(&encode(enc));
        assert!(decode(enc, &wire), "{group}: the {en} frame does not decode");
        g.bench_function(BenchmarkId::new("decode", en), |b| b.iter(|| decode(enc, black_box(&wire))));
    }
    g.finish();
}

fn text(b: &[u8]) -> &str {
    std::str::from_utf8(b).unwrap_or("")
}

fn codec(c: &mut Criterion) {
    for (name, req, ev) in frames() {
        both(c, &format!("send_{name}"), |enc| encode_request(&req, enc), |enc, w| match enc {
            Encoding::Json => decode_request_json(text(w)).is_ok(),
            Encoding::Postcard => decode_request_postcard(w).is_ok(),
        });
        both(c, &format!("event_{name}"), |enc| encode_server(&ev, enc), |enc, w| match enc {
            Encoding::Json => decode_server_json(text(w)).is_ok(),
            Encoding::Postcard => decode_server_postcard(w).is_ok(),
        });
    }
    let a = ack();
    both(c, "ack", |enc| encode_server(&a, enc), |enc, w| match enc {
        Encoding::Json => decode_server_json(text(w)).is_ok(),
        Encoding::Postcard => decode_server_postcard(w).is_ok(),
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(2));
    targets = codec
}

fn main() {
    sizes();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
