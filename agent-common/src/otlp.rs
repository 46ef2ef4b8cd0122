//! A small OTLP/HTTP protobuf encoder: the few messages of
//! `opentelemetry/proto/{common,resource,trace,metrics}/v1` and the collector's
//! `Export{Trace,Metrics}ServiceRequest` that the sidecar and the agent send, written straight
//! into one buffer (no generated code, no protoc, no allocation per nested message).
//!
//! Field numbers follow the OTLP protobuf definitions (opentelemetry-proto 1.x). The sidecar's
//! telemetry test decodes what this writes with the official definitions (the
//! `opentelemetry-proto` crate), so a wrong number or wire type fails a test, not a collector.

use std::borrow::Cow;
use std::string::String;
use std::vec::Vec;

/// One attribute value (`AnyValue`: the scalar kinds used here).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(Cow<'static, str>),
    Bool(bool),
    Int(i64),
    Double(f64),
}

impl From<&'static str> for Value {
    fn from(s: &'static str) -> Self {
        Value::Str(Cow::Borrowed(s))
    }
}
impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Str(Cow::Owned(s))
    }
}
impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}
impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::Int(i64::try_from(v).unwrap_or(i64::MAX))
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Double(v)
    }
}

/// `KeyValue`.
#[derive(Debug, Clone, PartialEq)]
pub struct Attr {
    pub key: Cow<'static, str>,
    pub value: Value,
}

/// An attribute with a static key.
pub fn attr(key: &'static str, value: impl Into<Value>) -> Attr {
    Attr {
        key: Cow::Borrowed(key),
        value: value.into(),
    }
}

/// `Span.SpanKind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    Internal = 1,
    Server = 2,
    Client = 3,
}

/// `Status.StatusCode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StatusCode {
    #[default]
    Unset = 0,
    Ok = 1,
    Error = 2,
}

/// `Span.Event`.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub time_unix_nano: u64,
    pub name: Cow<'static, str>,
    pub attrs: Vec<Attr>,
}

/// `Span.Link`.
#[derive(Debug, Clone, PartialEq)]
pub struct Link {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub attrs: Vec<Attr>,
}

/// `Span`.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
    pub name: Cow<'static, str>,
    pub kind: SpanKind,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    pub attrs: Vec<Attr>,
    pub events: Vec<Event>,
    pub links: Vec<Link>,
    pub status: StatusCode,
    pub status_message: Option<Cow<'static, str>>,
}

/// `NumberDataPoint`'s value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Number {
    Int(i64),
    Double(f64),
}

/// `NumberDataPoint`.
#[derive(Debug, Clone, PartialEq)]
pub struct NumberPoint {
    pub attrs: Vec<Attr>,
    pub start_unix_nano: u64,
    pub time_unix_nano: u64,
    pub value: Number,
}

/// `HistogramDataPoint` (explicit bounds; `counts` has one more entry than `bounds`).
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramPoint {
    pub attrs: Vec<Attr>,
    pub start_unix_nano: u64,
    pub time_unix_nano: u64,
    pub count: u64,
    pub sum: f64,
    pub bounds: Vec<f64>,
    pub counts: Vec<u64>,
}

/// A metric's data, always cumulative.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    Gauge(Vec<NumberPoint>),
    Sum {
        points: Vec<NumberPoint>,
        monotonic: bool,
    },
    Histogram(Vec<HistogramPoint>),
}

/// `Metric`.
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    pub name: Cow<'static, str>,
    pub description: Cow<'static, str>,
    pub unit: Cow<'static, str>,
    pub data: Data,
}

/// Who sends: the `Resource` attributes and the `InstrumentationScope`.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    pub resource: Vec<Attr>,
    pub scope_name: &'static str,
    pub scope_version: &'static str,
    /// The semantic conventions' schema URL the attributes follow.
    pub schema_url: &'static str,
}

const VARINT: u32 = 0;
const FIXED64: u32 = 1;
const LEN: u32 = 2;

/// A protobuf writer over one buffer.
#[derive(Debug, Default)]
pub struct Writer {
    pub buf: Vec<u8>,
}

fn varint_into(mut v: u64, out: &mut [u8; 10]) -> usize {
    let mut n = 0;
    loop {
        if v < 0x80 {
            out[n] = v as u8;
            return n + 1;
        }
        out[n] = (v as u8 & 0x7f) | 0x80;
        v >>= 7;
        n += 1;
    }
}

impl Writer {
    fn varint(&mut self, v: u64) {
        let mut tmp = [0u8; 10];
        let n = varint_into(v, &mut tmp);
        self.buf.extend_from_slice(&tmp[..n]);
    }
    fn tag(&mut self, field: u32, wire: u32) {
        self.varint(u64::from((field << 3) | wire));
    }
    fn uint(&mut self, field: u32, v: u64) {
        if v != 0 {
            self.tag(field, VARINT);
            self.varint(v);
        }
    }
    fn int64(&mut self, field: u32, v: i64) {
        self.tag(field, VARINT);
        self.varint(v as u64);
    }
    fn fixed64(&mut self, field: u32, v: u64) {
        self.tag(field, FIXED64);
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    fn double(&mut self, field: u32, v: f64) {
        self.fixed64(field, v.to_bits());
    }
    fn bytes(&mut self, field: u32, b: &[u8]) {
        self.tag(field, LEN);
        self.varint(b.len() as u64);
        self.buf.extend_from_slice(b);
    }
    fn str(&mut self, field: u32, s: &str) {
        if !s.is_empty() {
            self.bytes(field, s.as_bytes());
        }
    }
    /// A nested message: written in place, then its length put in front of it.
    fn message(&mut self, field: u32, f: impl FnOnce(&mut Self)) {
        self.tag(field, LEN);
        let start = self.buf.len();
        f(self);
        let len = self.buf.len() - start;
        let mut tmp = [0u8; 10];
        let n = varint_into(len as u64, &mut tmp);
        self.buf.splice(start..start, tmp[..n].iter().copied());
    }

    fn any_value(&mut self, field: u32, v: &Value) {
        self.message(field, |w| match v {
            Value::Str(s) => w.bytes(1, s.as_bytes()),
            Value::Bool(b) => {
                w.tag(2, VARINT);
                w.varint(u64::from(*b));
            }
            Value::Int(i) => w.int64(3, *i),
            Value::Double(d) => w.double(4, *d),
        });
    }
    fn attrs(&mut self, field: u32, attrs: &[Attr]) {
        for a in attrs {
            self.message(field, |w| {
                w.str(1, &a.key);
                w.any_value(2, &a.value);
            });
        }
    }
    fn resource(&mut self, field: u32, src: &Source) {
        self.message(field, |w| w.attrs(1, &src.resource));
    }
    fn scope(&mut self, field: u32, src: &Source) {
        self.message(field, |w| {
            w.str(1, src.scope_name);
            w.str(2, src.scope_version);
        });
    }

    fn span(&mut self, s: &Span) {
        self.bytes(1, &s.trace_id);
        self.bytes(2, &s.span_id);
        if let Some(p) = &s.parent_span_id {
            self.bytes(4, p);
        }
        self.str(5, &s.name);
        self.uint(6, s.kind as u64);
        self.fixed64(7, s.start_unix_nano);
        self.fixed64(8, s.end_unix_nano);
        self.attrs(9, &s.attrs);
        for e in &s.events {
            self.message(11, |w| {
                w.fixed64(1, e.time_unix_nano);
                w.str(2, &e.name);
                w.attrs(3, &e.attrs);
            });
        }
        for l in &s.links {
            self.message(13, |w| {
                w.bytes(1, &l.trace_id);
                w.bytes(2, &l.span_id);
                w.attrs(4, &l.attrs);
            });
        }
        if s.status != StatusCode::Unset || s.status_message.is_some() {
            self.message(15, |w| {
                if let Some(m) = &s.status_message {
                    w.str(2, m);
                }
                w.uint(3, s.status as u64);
            });
        }
    }

    fn number_point(&mut self, field: u32, p: &NumberPoint) {
        self.message(field, |w| {
            w.fixed64(2, p.start_unix_nano);
            w.fixed64(3, p.time_unix_nano);
            match p.value {
                Number::Double(d) => w.double(4, d),
                // sfixed64
                Number::Int(i) => w.fixed64(6, i as u64),
            }
            w.attrs(7, &p.attrs);
        });
    }

    fn histogram_point(&mut self, field: u32, p: &HistogramPoint) {
        self.message(field, |w| {
            w.fixed64(2, p.start_unix_nano);
            w.fixed64(3, p.time_unix_nano);
            w.fixed64(4, p.count);
            w.double(5, p.sum);
            // Packed repeated fixed64 / double.
            w.message(6, |w| {
                for c in &p.counts {
                    w.buf.extend_from_slice(&c.to_le_bytes());
                }
            });
            w.message(7, |w| {
                for b in &p.bounds {
                    w.buf.extend_from_slice(&b.to_bits().to_le_bytes());
                }
            });
            w.attrs(9, &p.attrs);
        });
    }

    fn metric(&mut self, m: &Metric) {
        self.str(1, &m.name);
        self.str(2, &m.description);
        self.str(3, &m.unit);
        match &m.data {
            Data::Gauge(points) => self.message(5, |w| {
                for p in points {
                    w.number_point(1, p);
                }
            }),
            Data::Sum { points, monotonic } => self.message(7, |w| {
                for p in points {
                    w.number_point(1, p);
                }
                // AGGREGATION_TEMPORALITY_CUMULATIVE
                w.uint(2, 2);
                if *monotonic {
                    w.tag(3, VARINT);
                    w.varint(1);
                }
            }),
            Data::Histogram(points) => self.message(9, |w| {
                for p in points {
                    w.histogram_point(1, p);
                }
                w.uint(2, 2);
            }),
        }
    }
}

/// `ExportTraceServiceRequest` with one resource and one scope.
pub fn encode_traces(src: &Source, spans: &[Span]) -> Vec<u8> {
    encode_export(src, spans, Writer::span)
}

/// `ExportMetricsServiceRequest` with one resource and one scope.
pub fn encode_metrics(src: &Source, metrics: &[Metric]) -> Vec<u8> {
    encode_export(src, metrics, Writer::metric)
}

/// Both export requests have one shape: resource (1) and scope (2) messages around the items,
/// each item field 2 of its scope message, the schema URL field 3 of both.
fn encode_export<T>(src: &Source, items: &[T], item: fn(&mut Writer, &T)) -> Vec<u8> {
    let mut w = Writer::default();
    w.message(1, |w| {
        w.resource(1, src);
        w.message(2, |w| {
            w.scope(1, src);
            for x in items {
                w.message(2, |w| item(w, x));
            }
            w.str(3, src.schema_url);
        });
        w.str(3, src.schema_url);
    });
    w.buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_are_little_endian_groups_of_seven_bits() {
        let mut w = Writer::default();
        w.varint(1);
        w.varint(300);
        w.varint(u64::MAX);
        assert_eq!(&w.buf[..3], &[0x01, 0xac, 0x02]);
        assert_eq!(w.buf.len(), 3 + 10);
    }

    #[test]
    fn a_nested_message_is_prefixed_with_its_length() {
        let mut w = Writer::default();
        // 200 bytes inside: a two-byte length.
        w.message(1, |w| w.bytes(2, &[7u8; 197]));
        assert_eq!(w.buf[0], 0x0a);
        assert_eq!(&w.buf[1..3], &[0xc8, 0x01]);
        assert_eq!(w.buf[3], 0x12);
        assert_eq!(w.buf.len(), 3 + 200);
    }
}
