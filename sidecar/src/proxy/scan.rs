//! One validating pass over a request body, without a tree of its strings.
//!
//! [`parse`] checks the bytes as strict JSON with the rules serde_json (`float_roundtrip`)
//! applies to a `Value` (no BOM, no NaN or Infinity, no trailing data, UTF-8 strings without
//! raw control characters or lone surrogates, numbers in range) plus the sidecar's depth
//! limit, and returns a skeleton: every value as a byte span of the body, objects with their
//! members as serde_json's map holds them (sorted by the decoded key, the last of duplicate
//! keys), strings left in place and decoded only when read.
//!
//! Each value carries two flags the forwarding and the audit hash need:
//! - `safe`: its bytes read as the same value under any conforming JSON parser as under
//!   serde_json: no duplicate or escaped keys, no number that serde_json writes differently
//!   (a big integer read as a float, `-0`, `1e5`); a safe value is forwarded as the client
//!   wrote it, an unsafe one as serde_json writes it.
//! - `canon`: its bytes are exactly serde_json's compact serialisation (no whitespace, keys in
//!   order, escapes as serde_json writes them), so the audit hashes them as they are.

use std::borrow::Cow;
use std::ops::Range;

/// Nesting beyond this is refused (tool schemas nest, but not this deep).
pub const MAX_DEPTH: usize = 64;

/// Nesting the parser follows at all: serde_json's own limit (its recursion budget of 128
/// refuses the 128th level, the top object counted). Deeper is refused whatever it is, as
/// serde_json refuses it, even under a key written again later.
const PARSE_DEPTH: usize = 127;

/// A value of the body: where it is and what it holds.
#[derive(Debug)]
pub struct Node<'a> {
    /// The value's bytes in the body (a string's with its quotes).
    pub span: Range<usize>,
    pub kind: Kind<'a>,
    pub safe: bool,
    pub canon: bool,
    /// A container in it nests deeper than [`MAX_DEPTH`] (counting the body as level 1).
    pub deep: bool,
}

#[derive(Debug)]
pub enum Kind<'a> {
    Null,
    Bool,
    Num,
    /// `escaped`: the string has escapes (decode to read it).
    Str {
        escaped: bool,
    },
    Array(Vec<Node<'a>>),
    /// Sorted by key, one member a key (the last written).
    Object(Vec<Member<'a>>),
}

#[derive(Debug)]
pub struct Member<'a> {
    pub key: Cow<'a, str>,
    /// The key was written without escapes.
    pub plain_key: bool,
    /// From the key's opening quote to the end of the value.
    pub span: Range<usize>,
    pub value: Node<'a>,
}

/// The top-level object: its members in the client's order (duplicates included), and the
/// members serde_json's map holds, by key.
#[derive(Debug)]
pub struct Doc<'a> {
    pub members: Vec<Member<'a>>,
    /// Indices into `members` of the last member of each key, sorted by key.
    pub order: Vec<usize>,
}

impl Doc<'_> {
    /// The member serde_json's map holds under `key`.
    pub fn get(&self, key: &str) -> Option<&Node<'_>> {
        self.order
            .binary_search_by(|&i| self.members[i].key.as_ref().cmp(key))
            .ok()
            .map(|i| &self.members[self.order[i]].value)
    }
}

/// Why the bytes are not a body.
#[derive(Debug, PartialEq, Eq)]
pub enum Invalid {
    Syntax(&'static str, usize),
    Depth,
    NotObject,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Invalid::Syntax(what, at) => write!(f, "{what} at byte {at}"),
            Invalid::Depth => write!(f, "nests deeper than {MAX_DEPTH} levels"),
            Invalid::NotObject => write!(f, "not a JSON object"),
        }
    }
}

/// Check `body` and return its skeleton.
pub fn parse(body: &[u8]) -> Result<Doc<'_>, Invalid> {
    let mut p = Parser { b: body, i: 0 };
    p.ws();
    let doc = if p.peek() == Some(b'{') {
        let (members, _, _) = p.members(1)?;
        let mut order: Vec<usize> = (0..members.len()).collect();
        // Stable: of equal keys the last stays last.
        order.sort_by(|&a, &b| members[a].key.cmp(&members[b].key));
        let mut kept: Vec<usize> = Vec::with_capacity(order.len());
        for i in order {
            match kept.last_mut() {
                Some(last) if members[*last].key == members[i].key => *last = i,
                _ => kept.push(i),
            }
        }
        // Only what serde_json's map keeps counts: a deep value under a key written again
        // later is dropped by it as by the forwarded body.
        if kept.iter().any(|&i| members[i].value.deep) {
            return Err(Invalid::Depth);
        }
        Doc {
            members,
            order: kept,
        }
    } else {
        p.value(1)?;
        p.ws();
        if p.i < body.len() {
            return Err(Invalid::Syntax("trailing characters", p.i));
        }
        return Err(Invalid::NotObject);
    };
    p.ws();
    if p.i < body.len() {
        return Err(Invalid::Syntax("trailing characters", p.i));
    }
    Ok(doc)
}

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
}

const fn stops() -> [bool; 256] {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 0x20 {
        t[c] = true;
        c += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
}

/// The bytes that end a run of plain string bytes: a quote, a backslash, a control character.
static STOP: [bool; 256] = stops();

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// Whether any of the 8 bytes is a quote, a backslash or below 0x20.
fn word_stops(x: u64) -> bool {
    let zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS;
    let below_space = x.wrapping_sub(ONES * 0x20) & !x & HIGHS;
    (zero(x ^ (ONES * u64::from(b'"'))) | zero(x ^ (ONES * u64::from(b'\\'))) | below_space) != 0
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn err<T>(&self, what: &'static str) -> Result<T, Invalid> {
        Err(Invalid::Syntax(what, self.i))
    }

    /// Skip whitespace; whether there was any.
    fn ws(&mut self) -> bool {
        let start = self.i;
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
        self.i != start
    }

    fn value(&mut self, depth: usize) -> Result<Node<'a>, Invalid> {
        let start = self.i;
        let leaf = |p: &Self, kind| {
            Ok(Node {
                span: start..p.i,
                kind,
                safe: true,
                canon: true,
                deep: false,
            })
        };
        match self.peek() {
            Some(b'{') => {
                let (mut members, safe, canon) = self.members(depth)?;
                // Sorted (stable) and the last of equal keys kept, as serde_json's map holds
                // them; a duplicate makes the bytes unsafe, keys out of order non-canonical.
                let sorted = members.windows(2).all(|w| w[0].key < w[1].key);
                let mut safe = safe;
                if !sorted {
                    members.sort_by(|a, b| a.key.cmp(&b.key));
                    let before = members.len();
                    let mut kept: Vec<Member<'a>> = Vec::with_capacity(before);
                    for m in members {
                        match kept.last_mut() {
                            Some(last) if last.key == m.key => *last = m,
                            _ => kept.push(m),
                        }
                    }
                    safe &= kept.len() == before;
                    members = kept;
                }
                Ok(Node {
                    span: start..self.i,
                    deep: depth > MAX_DEPTH || members.iter().any(|m| m.value.deep),
                    kind: Kind::Object(members),
                    safe,
                    canon: canon && sorted && safe,
                })
            }
            Some(b'[') => {
                if depth > PARSE_DEPTH {
                    return Err(Invalid::Depth);
                }
                self.i += 1;
                let mut items = Vec::new();
                let mut safe = true;
                let mut canon = !self.ws();
                if self.peek() == Some(b']') {
                    self.i += 1;
                } else {
                    loop {
                        let v = self.value(depth + 1)?;
                        safe &= v.safe;
                        canon &= v.canon;
                        items.push(v);
                        canon &= !self.ws();
                        match self.peek() {
                            Some(b',') => {
                                self.i += 1;
                                canon &= !self.ws();
                            }
                            Some(b']') => {
                                self.i += 1;
                                break;
                            }
                            Some(_) => return self.err("expected `,` or `]`"),
                            None => return self.err("EOF in an array"),
                        }
                    }
                }
                Ok(Node {
                    span: start..self.i,
                    deep: depth > MAX_DEPTH || items.iter().any(|x| x.deep),
                    kind: Kind::Array(items),
                    safe,
                    canon,
                })
            }
            Some(b'"') => {
                let (_, escaped, canon) = self.string()?;
                Ok(Node {
                    span: start..self.i,
                    kind: Kind::Str { escaped },
                    safe: true,
                    canon,
                    deep: false,
                })
            }
            Some(b't') => {
                self.literal(b"true")?;
                leaf(self, Kind::Bool)
            }
            Some(b'f') => {
                self.literal(b"false")?;
                leaf(self, Kind::Bool)
            }
            Some(b'n') => {
                self.literal(b"null")?;
                leaf(self, Kind::Null)
            }
            Some(b'-' | b'0'..=b'9') => {
                let canon = self.number()?;
                Ok(Node {
                    span: start..self.i,
                    kind: Kind::Num,
                    safe: canon,
                    canon,
                    deep: false,
                })
            }
            Some(_) => self.err("expected a value"),
            None => self.err("EOF while parsing a value"),
        }
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), Invalid> {
        if self.b[self.i..].starts_with(word) {
            self.i += word.len();
            Ok(())
        } else {
            self.err("expected a value")
        }
    }

    /// The members of the object at `self.i` in the order written, and whether they are safe
    /// and canonical as written (before sorting).
    fn members(&mut self, depth: usize) -> Result<(Vec<Member<'a>>, bool, bool), Invalid> {
        if depth > PARSE_DEPTH {
            return Err(Invalid::Depth);
        }
        self.i += 1;
        let mut members = Vec::new();
        let mut safe = true;
        let mut canon = !self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok((members, safe, canon));
        }
        loop {
            let start = self.i;
            if self.peek() != Some(b'"') {
                return self.err("expected a key");
            }
            let (inner, escaped, _) = self.string()?;
            let key = decode(&self.b[inner], escaped);
            canon &= !self.ws();
            if self.peek() != Some(b':') {
                return self.err("expected `:`");
            }
            self.i += 1;
            canon &= !self.ws();
            let value = self.value(depth + 1)?;
            safe &= value.safe && !escaped;
            canon &= value.canon && !escaped;
            members.push(Member {
                key,
                plain_key: !escaped,
                span: start..self.i,
                value,
            });
            canon &= !self.ws();
            match self.peek() {
                Some(b',') => {
                    self.i += 1;
                    canon &= !self.ws();
                }
                Some(b'}') => {
                    self.i += 1;
                    return Ok((members, safe, canon));
                }
                Some(_) => return self.err("expected `,` or `}`"),
                None => return self.err("EOF in an object"),
            }
        }
    }

    /// The string at `self.i`: its contents' span, whether it has escapes, and whether they
    /// are all ones serde_json writes.
    fn string(&mut self) -> Result<(Range<usize>, bool, bool), Invalid> {
        self.i += 1;
        let start = self.i;
        let b = self.b;
        let mut escaped = false;
        let mut canon = true;
        // Any byte above ASCII seen (bit 7 of some byte): only then is UTF-8 checked.
        let mut high = 0u64;
        loop {
            while self.i + 8 <= b.len() {
                let w = u64::from_le_bytes(b[self.i..self.i + 8].try_into().unwrap_or([0; 8]));
                if word_stops(w) {
                    break;
                }
                high |= w;
                self.i += 8;
            }
            while self.i < b.len() && !STOP[usize::from(b[self.i])] {
                high |= u64::from(b[self.i]);
                self.i += 1;
            }
            match self.peek() {
                None => return self.err("EOF while parsing a string"),
                Some(b'"') => break,
                Some(b'\\') => {
                    escaped = true;
                    self.i += 1;
                    match self.peek() {
                        Some(b'"' | b'\\' | b'b' | b'f' | b'n' | b'r' | b't') => self.i += 1,
                        Some(b'/') => {
                            canon = false;
                            self.i += 1;
                        }
                        Some(b'u') => {
                            canon = false;
                            self.i += 1;
                            let n = self.hex4()?;
                            if (0xDC00..0xE000).contains(&n) {
                                return self.err("lone trailing surrogate in hex escape");
                            }
                            if (0xD800..0xDC00).contains(&n) {
                                if !b[self.i..].starts_with(b"\\u") {
                                    return self.err("lone leading surrogate in hex escape");
                                }
                                self.i += 2;
                                let low = self.hex4()?;
                                if !(0xDC00..0xE000).contains(&low) {
                                    return self.err("lone leading surrogate in hex escape");
                                }
                            }
                        }
                        Some(_) => return self.err("invalid escape"),
                        None => return self.err("EOF while parsing a string"),
                    }
                }
                Some(_) => return self.err("control character in a string"),
            }
        }
        let inner = start..self.i;
        if high & HIGHS != 0 && std::str::from_utf8(&b[inner.clone()]).is_err() {
            return Err(Invalid::Syntax("invalid unicode code point", start));
        }
        self.i += 1;
        Ok((inner, escaped, canon))
    }

    fn hex4(&mut self) -> Result<u32, Invalid> {
        let Some(h) = self.b.get(self.i..self.i + 4) else {
            return self.err("EOF while parsing a string");
        };
        let mut n = 0;
        for &c in h {
            let d = match c {
                b'0'..=b'9' => c - b'0',
                b'a'..=b'f' => c - b'a' + 10,
                b'A'..=b'F' => c - b'A' + 10,
                _ => return self.err("invalid escape"),
            };
            n = n * 16 + u32::from(d);
        }
        self.i += 4;
        Ok(n)
    }

    /// The number at `self.i`; whether serde_json writes it as it is written.
    fn number(&mut self) -> Result<bool, Invalid> {
        let start = self.i;
        let b = self.b;
        let digits = |p: &mut Self| {
            let s = p.i;
            while let Some(b'0'..=b'9') = p.peek() {
                p.i += 1;
            }
            p.i - s
        };
        let negative = self.peek() == Some(b'-');
        if negative {
            self.i += 1;
        }
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                digits(self);
            }
            _ => return self.err("invalid number"),
        }
        let mut integer = true;
        if self.peek() == Some(b'.') {
            integer = false;
            self.i += 1;
            if digits(self) == 0 {
                return self.err("invalid number");
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            integer = false;
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if digits(self) == 0 {
                return self.err("invalid number");
            }
        }
        let text = &b[start..self.i];
        // Plain integers in range are written back as they are (but `-0` as `0`).
        if integer && text.len() <= 20 {
            let s = std::str::from_utf8(text).unwrap_or("");
            if negative {
                if s != "-0" && s.parse::<i64>().is_ok() {
                    return Ok(true);
                }
            } else if s.parse::<u64>().is_ok() {
                return Ok(true);
            }
        }
        // Floats and big integers: as serde_json reads and writes them.
        match serde_json::from_slice::<serde_json::Value>(text) {
            Ok(v) => Ok(serde_json::to_vec(&v).is_ok_and(|w| w == text)),
            Err(_) => Err(Invalid::Syntax("number out of range", start)),
        }
    }
}

/// A string's contents as read (`raw` is between the quotes, checked by [`parse`]).
pub fn decode(raw: &[u8], escaped: bool) -> Cow<'_, str> {
    if !escaped {
        return Cow::Borrowed(std::str::from_utf8(raw).unwrap_or_default());
    }
    let mut out = Vec::with_capacity(raw.len());
    decode_into(raw, &mut out);
    Cow::Owned(String::from_utf8(out).unwrap_or_default())
}

/// The index of the first backslash in `raw` (its length without one), 8 bytes a step.
fn backslash(raw: &[u8]) -> usize {
    let mut i = 0;
    while i + 8 <= raw.len() {
        let w = u64::from_le_bytes(raw[i..i + 8].try_into().unwrap_or([0; 8]));
        let x = w ^ (ONES * u64::from(b'\\'));
        if x.wrapping_sub(ONES) & !x & HIGHS != 0 {
            break;
        }
        i += 8;
    }
    i + raw[i..]
        .iter()
        .position(|&c| c == b'\\')
        .unwrap_or(raw.len() - i)
}

/// Append a string's contents as read (`raw` is between the quotes, checked by [`parse`]).
pub fn decode_into(raw: &[u8], out: &mut Vec<u8>) {
    let mut i = 0;
    while i < raw.len() {
        let run = backslash(&raw[i..]);
        out.extend_from_slice(&raw[i..i + run]);
        i += run;
        if i >= raw.len() {
            break;
        }
        let c = raw.get(i + 1).copied().unwrap_or(b'\\');
        i += 2;
        let ch = match c {
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let hex = |at: usize| {
                    raw.get(at..at + 4)
                        .and_then(|h| std::str::from_utf8(h).ok())
                        .and_then(|h| u32::from_str_radix(h, 16).ok())
                        .unwrap_or(0xFFFD)
                };
                let n = hex(i);
                i += 4;
                let n = if (0xD800..0xDC00).contains(&n) {
                    let low = hex(i + 2);
                    i += 6;
                    0x10000 + ((n - 0xD800) << 10) + (low.wrapping_sub(0xDC00) & 0x3FF)
                } else {
                    n
                };
                char::from_u32(n).unwrap_or('\u{FFFD}')
            }
            other => char::from(other),
        };
        out.extend_from_slice(ch.encode_utf8(&mut [0; 4]).as_bytes());
    }
}

/// Where [`Node::write_canonical`] writes: a buffer, or a hash.
pub trait Out {
    fn put(&mut self, bytes: &[u8]);
}

impl Out for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

impl Out for ring::hmac::Context {
    fn put(&mut self, bytes: &[u8]) {
        self.update(bytes);
    }
}

impl<'a> Node<'a> {
    /// A string's contents as read.
    pub fn str<'b>(&self, body: &'b [u8]) -> Option<Cow<'b, str>> {
        match self.kind {
            Kind::Str { escaped } => Some(decode(
                &body[self.span.start + 1..self.span.end - 1],
                escaped,
            )),
            _ => None,
        }
    }

    /// An object's member `key` (the last written).
    pub fn get(&self, key: &str) -> Option<&Node<'a>> {
        match &self.kind {
            Kind::Object(m) => m
                .binary_search_by(|x| x.key.as_ref().cmp(key))
                .ok()
                .map(|i| &m[i].value),
            _ => None,
        }
    }

    /// The value as serde_json reads it (a small value: it is copied).
    pub fn to_value(&self, body: &[u8]) -> serde_json::Value {
        serde_json::from_slice(&body[self.span.clone()]).unwrap_or(serde_json::Value::Null)
    }

    /// Append serde_json's compact serialisation of the value to `out`.
    pub fn write_canonical(&self, body: &[u8], out: &mut impl Out) {
        if self.canon {
            out.put(&body[self.span.clone()]);
            return;
        }
        match &self.kind {
            Kind::Null | Kind::Bool => out.put(&body[self.span.clone()]),
            Kind::Num => {
                let mut v = Vec::new();
                let _ = serde_json::to_writer(&mut v, &self.to_value(body));
                out.put(&v);
            }
            Kind::Str { .. } => {
                let s = self.str(body).unwrap_or_default();
                let mut v = Vec::with_capacity(s.len() + 2);
                let _ = serde_json::to_writer(&mut v, s.as_ref());
                out.put(&v);
            }
            Kind::Array(items) => {
                out.put(b"[");
                for (i, x) in items.iter().enumerate() {
                    if i > 0 {
                        out.put(b",");
                    }
                    x.write_canonical(body, out);
                }
                out.put(b"]");
            }
            Kind::Object(members) => {
                out.put(b"{");
                for (i, m) in members.iter().enumerate() {
                    if i > 0 {
                        out.put(b",");
                    }
                    write_key(&m.key, out);
                    m.value.write_canonical(body, out);
                }
                out.put(b"}");
            }
        }
    }
}

/// `"key":` as serde_json writes it.
pub fn write_key(key: &str, out: &mut impl Out) {
    let mut v = Vec::with_capacity(key.len() + 3);
    let _ = serde_json::to_writer(&mut v, key);
    v.push(b':');
    out.put(&v);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canonical(body: &[u8]) -> Vec<u8> {
        let doc = parse(body).unwrap();
        let mut out = b"{".to_vec();
        for (n, &i) in doc.order.iter().enumerate() {
            if n > 0 {
                out.push(b',');
            }
            write_key(&doc.members[i].key, &mut out);
            doc.members[i].value.write_canonical(body, &mut out);
        }
        out.push(b'}');
        out
    }

    #[test]
    fn the_canonical_form_is_serde_jsons_serialisation() {
        for body in [
            r#"{"b" : [1, 2.50, -0, 1e5, 18446744073709551616, "\u00e9\/\ud83d\ude00\n\u0001"], "a":{"z":1,"y":{"q":null,"p":true}}, "a":{"k":"v"}}"#,
            r#"{"pr\u006fmpt":"x","messages":[{"role":"user","content":"hi"}]}"#,
            r#"{"x":-1.7976931348623157e308,"y":5e-324,"z":1E400}"#,
            // One space inside a nested object: before or after a colon, before or after a
            // comma (each alone makes the object's bytes non-canonical).
            r#"{"a":{"k" :1}}"#,
            r#"{"a":{"k": 1}}"#,
            r#"{"a":{"k":1 ,"l":2}}"#,
            r#"{"a":{"k":1, "l":2}}"#,
        ] {
            let b = body.as_bytes();
            match serde_json::from_slice::<serde_json::Value>(b) {
                Ok(v) => assert_eq!(
                    String::from_utf8(canonical(b)).unwrap(),
                    serde_json::to_string(&v).unwrap()
                ),
                Err(_) => assert!(parse(b).is_err(), "{body}"),
            }
        }
    }

    #[test]
    fn flags_mark_what_may_be_forwarded_as_written() {
        let doc =
            parse(br#"{"a":{"k":1,"k":2},"b":{"y":1,"x":[1.0]},"c":-0,"d":{"\u0061":1}}"#).unwrap();
        let flags = |k: &str| {
            let n = doc.get(k).unwrap();
            (n.safe, n.canon)
        };
        assert_eq!(flags("a"), (false, false));
        assert_eq!(flags("b"), (true, false));
        assert_eq!(flags("c"), (false, false));
        assert_eq!(flags("d"), (false, false));
        let doc = parse(br#"{"a":{"x":[1,"\n"],"y":0.5}}"#).unwrap();
        assert!(doc.get("a").is_some_and(|n| n.safe && n.canon));
    }

    #[test]
    fn only_the_depth_of_what_serde_json_keeps_counts() {
        let deep = format!("{}{}", "[".repeat(64), "]".repeat(64));
        let body = format!(r#"{{"x":{deep},"y":1,"x":[]}}"#);
        assert!(parse(body.as_bytes()).is_ok());
        let body = format!(r#"{{"x":[],"x":{deep}}}"#);
        assert_eq!(parse(body.as_bytes()).unwrap_err(), Invalid::Depth);
        let body = format!(r#"{{"a":{{"x":{deep},"x":1}}}}"#);
        assert!(parse(body.as_bytes()).is_ok());
        let body = format!(r#"{{"a":[{deep}]}}"#);
        assert_eq!(parse(body.as_bytes()).unwrap_err(), Invalid::Depth);
        // A value under a key written again later is dropped, as serde_json drops it, only
        // as deep as serde_json reads at all: beyond its own limit, the body is refused as
        // serde_json refuses it.
        for levels in 120..140 {
            for (open, close) in [("[", "]"), (r#"{"k":"#, "}")] {
                let body = format!(
                    r#"{{"x":{}1{},"x":1}}"#,
                    open.repeat(levels),
                    close.repeat(levels)
                );
                assert_eq!(
                    parse(body.as_bytes()).is_ok(),
                    serde_json::from_slice::<serde_json::Value>(body.as_bytes()).is_ok(),
                    "{levels} levels of {open}"
                );
            }
        }
        // Objects count as arrays do: `MAX_DEPTH` levels are read, one more is refused.
        let objects = |levels: usize| {
            format!(
                "{}{{}}{}",
                r#"{"a":"#.repeat(levels - 1),
                "}".repeat(levels - 1)
            )
        };
        assert!(parse(objects(MAX_DEPTH).as_bytes()).is_ok());
        assert_eq!(
            parse(objects(MAX_DEPTH + 1).as_bytes()).unwrap_err(),
            Invalid::Depth
        );
    }

    #[test]
    fn the_word_test_finds_every_stop_byte() {
        for c in 0u8..=255 {
            for at in 0..8 {
                let mut w = [b'a'; 8];
                w[at] = c;
                assert_eq!(
                    word_stops(u64::from_le_bytes(w)),
                    STOP[usize::from(c)],
                    "{c} at {at}"
                );
            }
        }
    }

    /// A body that is not an object is named for what is wrong first: trailing bytes after
    /// the value, else that it is no object; each reason reads as documented.
    #[test]
    fn a_value_that_is_no_object_is_named_for_what_is_wrong() {
        assert_eq!(parse(b"[1]").err(), Some(Invalid::NotObject));
        // Eight bytes, a string from the second: the word loop must not read past the end.
        assert_eq!(parse(b"\"abcdef\"").err(), Some(Invalid::NotObject));
        assert_eq!(parse(b" [1] \n").err(), Some(Invalid::NotObject));
        assert_eq!(
            parse(b"[1] x").err(),
            Some(Invalid::Syntax("trailing characters", 4))
        );
        assert_eq!(
            parse(b"{} x").err(),
            Some(Invalid::Syntax("trailing characters", 3))
        );
        assert_eq!(
            Invalid::Syntax("trailing characters", 4).to_string(),
            "trailing characters at byte 4"
        );
        assert_eq!(
            Invalid::Depth.to_string(),
            format!("nests deeper than {MAX_DEPTH} levels")
        );
        assert_eq!(Invalid::NotObject.to_string(), "not a JSON object");
    }

    /// Bytes that are no UTF-8 are refused however they line up with the 8-byte words the
    /// string loop reads (eight bytes of 0x80 OR to exactly the words' high bits).
    #[test]
    fn invalid_utf8_is_refused_wherever_it_lies() {
        for lead in 0..9 {
            for run in 1..=17 {
                let mut body = br#"{"a":""#.to_vec();
                body.extend(std::iter::repeat_n(b'x', lead));
                body.extend(std::iter::repeat_n(0x80, run));
                body.extend_from_slice(br#""}"#);
                assert!(
                    matches!(
                        parse(&body),
                        Err(Invalid::Syntax("invalid unicode code point", _))
                    ),
                    "{lead} + {run}"
                );
            }
        }
    }

    /// Escapes and numbers the parser reads as serde_json does: surrogates in upper-case hex
    /// checked by their value, a number's fraction and exponent with at least one digit.
    #[test]
    fn escapes_and_numbers_are_read_as_serde_json_reads_them() {
        for body in [
            r#"{"a":"\uD83D\uDE00"}"#,
            r#"{"a":"\uD83D"}"#,
            r#"{"a":"\uDE00"}"#,
            r#"{"a":"\uD83D\u0041"}"#,
            r#"{"a":"\uFFFF\uABCD\u00E9"}"#,
            r#"{"a":1.}"#,
            r#"{"a":1.5e}"#,
            r#"{"a":1e+}"#,
            r#"{"a":-}"#,
            r#"{"a":10.25E-3}"#,
        ] {
            assert_eq!(
                parse(body.as_bytes()).is_ok(),
                serde_json::from_str::<serde_json::Value>(body).is_ok(),
                "{body}"
            );
        }
        // A fraction or exponent without digits is named where it stops.
        assert_eq!(
            parse(br#"{"a":1.}"#).err(),
            Some(Invalid::Syntax("invalid number", 7))
        );
        assert_eq!(
            parse(br#"{"a":1e+}"#).err(),
            Some(Invalid::Syntax("invalid number", 8))
        );
    }
}
