//! A small, strict JSON reader and writer: all the JSON the outbox needs in the browser.
//!
//! The browser module once did its JSON with serde_json and serde's derives: a quarter of the
//! module (issue #15), for records of a dozen fields. This reader parses RFC 8259 text into a
//! tree of [`Node`]s that borrow from the input and remember their own text (so a payload or a
//! server's state is kept byte for byte, as serde_json's `RawValue` did), and the writer appends
//! to a `String`. It never formats a float: the outbox writes only integers, strings and raw
//! JSON.
//!
//! The types' conversions live in [`codec`](super::codec). Natively, every one of them is
//! checked against serde_json and the serde derives the types keep (they stay the reference
//! for the stored format), so records written by either read the same.

use std::borrow::Cow;
use std::fmt;

/// How deep arrays and objects may nest: far more than any record, and a bound on recursion.
const MAX_DEPTH: usize = 128;

/// A parsed JSON value and the exact text it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Node<'a> {
    /// The value's own text, as it was in the input (without surrounding whitespace).
    pub raw: &'a str,
    /// The value.
    pub value: Value<'a>,
}

/// A JSON value. Numbers keep their text: the reader says what it needs (an integer, a float).
#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    /// `null`.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// A number, as written.
    Number(&'a str),
    /// A string, unescaped.
    String(Cow<'a, str>),
    /// An array.
    Array(Vec<Node<'a>>),
    /// An object, members in order.
    Object(Vec<(Cow<'a, str>, Node<'a>)>),
}

/// Why a text is not JSON, or not the JSON a reader expected: a message and a path such as
/// `backoff.baseMs` or `results[2].id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonError {
    /// Where, as a dotted path (empty for the whole value).
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for JsonError {}

impl JsonError {
    /// An error at the top of the value.
    pub fn new(message: impl Into<String>) -> Self {
        JsonError {
            path: String::new(),
            message: message.into(),
        }
    }

    /// The same error, one level deeper: under member `key` of an object.
    pub fn under(mut self, key: &str) -> Self {
        self.path = match self.path.is_empty() {
            true => key.to_owned(),
            false if self.path.starts_with('[') => format!("{key}{}", self.path),
            false => format!("{key}.{}", self.path),
        };
        self
    }

    /// The same error, under element `index` of an array.
    pub fn at(mut self, index: usize) -> Self {
        self.path = match self.path.is_empty() {
            true => format!("[{index}]"),
            false if self.path.starts_with('[') => format!("[{index}]{}", self.path),
            false => format!("[{index}].{}", self.path),
        };
        self
    }
}

/// Parses a whole JSON text.
pub fn parse(text: &str) -> Result<Node<'_>, JsonError> {
    read(text, true)
}

/// Checks that `text` is one JSON value, without building its tree (a payload is only
/// checked, never read).
pub fn check(text: &str) -> Result<(), JsonError> {
    read(text, false).map(drop)
}

fn read(text: &str, keep: bool) -> Result<Node<'_>, JsonError> {
    let mut parser = Parser { text, at: 0, keep };
    parser.space();
    let node = parser.value(0)?;
    parser.space();
    if parser.at != text.len() {
        return Err(parser.error("trailing characters after the value"));
    }
    Ok(node)
}

/// Whether `text` is one JSON value.
pub fn is_valid(text: &str) -> bool {
    check(text).is_ok()
}

struct Parser<'a> {
    text: &'a str,
    at: usize,
    /// Whether to keep what is read (false: only check it).
    keep: bool,
}

impl<'a> Parser<'a> {
    fn error(&self, what: &str) -> JsonError {
        JsonError::new(format!("{what} at byte {}", self.at))
    }

    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.at).copied()
    }

    fn space(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    fn literal(&mut self, word: &str) -> Result<(), JsonError> {
        if self.text[self.at..].starts_with(word) {
            self.at += word.len();
            Ok(())
        } else {
            Err(self.error("not a JSON value"))
        }
    }

    fn value(&mut self, depth: usize) -> Result<Node<'a>, JsonError> {
        if depth > MAX_DEPTH {
            return Err(self.error("nested too deep"));
        }
        let start = self.at;
        let value = match self.peek() {
            Some(b'n') => self.literal("null").map(|()| Value::Null)?,
            Some(b't') => self.literal("true").map(|()| Value::Bool(true))?,
            Some(b'f') => self.literal("false").map(|()| Value::Bool(false))?,
            Some(b'"') => Value::String(self.string()?),
            Some(b'[') => self.array(depth)?,
            Some(b'{') => self.object(depth)?,
            Some(b'-' | b'0'..=b'9') => Value::Number(self.number()?),
            Some(_) => return Err(self.error("not a JSON value")),
            None => return Err(self.error("the text ends where a value was expected")),
        };
        Ok(Node {
            raw: &self.text[start..self.at],
            value,
        })
    }

    fn digits(&mut self) -> usize {
        let start = self.at;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.at += 1;
        }
        self.at - start
    }

    fn number(&mut self) -> Result<&'a str, JsonError> {
        let start = self.at;
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        match self.peek() {
            Some(b'0') => self.at += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(self.error("a number needs digits")),
        }
        if self.peek() == Some(b'.') {
            self.at += 1;
            if self.digits() == 0 {
                return Err(self.error("a fraction needs digits"));
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.at += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.at += 1;
            }
            if self.digits() == 0 {
                return Err(self.error("an exponent needs digits"));
            }
        }
        Ok(&self.text[start..self.at])
    }

    fn hex4(&mut self) -> Result<u32, JsonError> {
        let digits = self
            .text
            .get(self.at..self.at + 4)
            .ok_or_else(|| self.error("a \\u escape needs four hex digits"))?;
        let value =
            u32::from_str_radix(digits, 16).map_err(|_| self.error("bad \\u escape digits"))?;
        if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(self.error("bad \\u escape digits"));
        }
        self.at += 4;
        Ok(value)
    }

    fn string(&mut self) -> Result<Cow<'a, str>, JsonError> {
        self.at += 1; // the opening quote
        let start = self.at;
        // Most strings have no escape: borrow them.
        loop {
            match self.peek() {
                Some(b'"') => {
                    let text = &self.text[start..self.at];
                    self.at += 1;
                    return Ok(Cow::Borrowed(text));
                }
                Some(b'\\') => break,
                Some(0..=0x1f) => return Err(self.error("a control character in a string")),
                Some(_) => self.at += 1,
                None => return Err(self.error("a string that does not end")),
            }
        }
        let mut out = String::from(&self.text[start..self.at]);
        loop {
            match self.peek() {
                Some(b'"') => {
                    self.at += 1;
                    return Ok(Cow::Owned(out));
                }
                Some(b'\\') => {
                    self.at += 1;
                    let escaped = self
                        .peek()
                        .ok_or_else(|| self.error("a string that does not end"))?;
                    self.at += 1;
                    match escaped {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let first = self.hex4()?;
                            let code = if (0xD800..0xDC00).contains(&first) {
                                if !self.text[self.at..].starts_with("\\u") {
                                    return Err(self.error("a lone surrogate"));
                                }
                                self.at += 2;
                                let second = self.hex4()?;
                                if !(0xDC00..0xE000).contains(&second) {
                                    return Err(self.error("a lone surrogate"));
                                }
                                0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00)
                            } else {
                                first
                            };
                            out.push(
                                char::from_u32(code)
                                    .ok_or_else(|| self.error("a lone surrogate"))?,
                            );
                        }
                        _ => return Err(self.error("an unknown escape")),
                    }
                }
                Some(0..=0x1f) => return Err(self.error("a control character in a string")),
                Some(_) => {
                    // Copy up to the next quote or escape at once (the input is valid UTF-8).
                    let rest = &self.text[self.at..];
                    let end = rest
                        .find(|c: char| c == '"' || c == '\\' || c < ' ')
                        .unwrap_or(rest.len());
                    out.push_str(&rest[..end]);
                    self.at += end;
                }
                None => return Err(self.error("a string that does not end")),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<Value<'a>, JsonError> {
        self.at += 1;
        let mut items = Vec::new();
        self.space();
        if self.peek() == Some(b']') {
            self.at += 1;
            return Ok(Value::Array(items));
        }
        loop {
            self.space();
            let item = self.value(depth + 1)?;
            if self.keep {
                items.push(item);
            }
            self.space();
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b']') => {
                    self.at += 1;
                    return Ok(Value::Array(items));
                }
                _ => return Err(self.error("expected , or ] in an array")),
            }
        }
    }

    fn object(&mut self, depth: usize) -> Result<Value<'a>, JsonError> {
        self.at += 1;
        let mut members: Vec<(Cow<'a, str>, Node<'a>)> = Vec::new();
        self.space();
        if self.peek() == Some(b'}') {
            self.at += 1;
            return Ok(Value::Object(members));
        }
        loop {
            self.space();
            if self.peek() != Some(b'"') {
                return Err(self.error("expected a member name"));
            }
            let name = self.string()?;
            self.space();
            if self.peek() != Some(b':') {
                return Err(self.error("expected : after a member name"));
            }
            self.at += 1;
            self.space();
            let value = self.value(depth + 1)?;
            // A repeated name is not refused here (the strict readers refuse it, see
            // `Node::fields`): checking every object would be quadratic in a state that is only
            // kept as text.
            if self.keep {
                members.push((name, value));
            }
            self.space();
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b'}') => {
                    self.at += 1;
                    return Ok(Value::Object(members));
                }
                _ => return Err(self.error("expected , or } in an object")),
            }
        }
    }
}

impl<'a> Node<'a> {
    fn kind(&self) -> &'static str {
        match self.value {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Number(_) => "a number",
            Value::String(_) => "a string",
            Value::Array(_) => "an array",
            Value::Object(_) => "an object",
        }
    }

    fn expected(&self, what: &str) -> JsonError {
        JsonError::new(format!("expected {what}, found {}", self.kind()))
    }

    /// Whether the value is `null`.
    pub fn is_null(&self) -> bool {
        self.value == Value::Null
    }

    /// The value as a string.
    pub fn str(&self) -> Result<&str, JsonError> {
        match &self.value {
            Value::String(s) => Ok(s),
            _ => Err(self.expected("a string")),
        }
    }

    /// The value as a boolean.
    pub fn bool(&self) -> Result<bool, JsonError> {
        match self.value {
            Value::Bool(b) => Ok(b),
            _ => Err(self.expected("a boolean")),
        }
    }

    /// The value as a non-negative integer (`7`, not `7.0` or `-1`).
    pub fn u64(&self) -> Result<u64, JsonError> {
        match self.value {
            Value::Number(text) => text.parse::<u64>().map_err(|_| {
                JsonError::new(format!("expected a non-negative integer, found {text}"))
            }),
            _ => Err(self.expected("a non-negative integer")),
        }
    }

    /// The value as a `u32`.
    pub fn u32(&self) -> Result<u32, JsonError> {
        u32::try_from(self.u64()?).map_err(|_| JsonError::new("the number is too large"))
    }

    /// The value as a `u16`.
    pub fn u16(&self) -> Result<u16, JsonError> {
        u16::try_from(self.u64()?).map_err(|_| JsonError::new("the number is too large"))
    }

    /// The value as a `usize`.
    pub fn usize(&self) -> Result<usize, JsonError> {
        usize::try_from(self.u64()?).map_err(|_| JsonError::new("the number is too large"))
    }

    /// The value as a float.
    ///
    /// Exact (correctly rounded) for up to 15 significant digits and exponents within ±22, which
    /// covers every fraction an option takes (`0.25`, `1.5`, `2`); beyond that it may be an ulp
    /// off. Rust's exact parser and its tables cost the browser module kilobytes for three
    /// options.
    pub fn f64(&self) -> Result<f64, JsonError> {
        match self.value {
            // The parser has checked the grammar: -? digits (. digits)? ([eE] [+-]? digits)?
            Value::Number(text) => Ok(number_to_f64(text)),
            _ => Err(self.expected("a number")),
        }
    }

    /// The elements of an array.
    pub fn array(&self) -> Result<&[Node<'a>], JsonError> {
        match &self.value {
            Value::Array(items) => Ok(items),
            _ => Err(self.expected("an array")),
        }
    }

    /// The members of an object.
    pub fn object(&self) -> Result<&[(Cow<'a, str>, Node<'a>)], JsonError> {
        match &self.value {
            Value::Object(members) => Ok(members),
            _ => Err(self.expected("an object")),
        }
    }

    /// A member of an object, if present (and not `null`).
    pub fn get(&self, name: &str) -> Option<&Node<'a>> {
        match &self.value {
            Value::Object(members) => members
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v)
                .filter(|v| !v.is_null()),
            _ => None,
        }
    }

    /// Reads the object's members in order: `read(name, node)` for each, with errors placed under
    /// the member's name. `read` returns whether it knew the name; an unknown one is an error
    /// ("unknown field"), as serde's `deny_unknown_fields` is: a misspelled option must not be
    /// dropped silently. A repeated name is an error too.
    pub fn fields(
        &self,
        mut read: impl FnMut(&str, &Node<'a>) -> Result<bool, JsonError>,
    ) -> Result<(), JsonError> {
        let members = self.object()?;
        for (i, (name, value)) in members.iter().enumerate() {
            if members[..i].iter().any(|(earlier, _)| earlier == name) {
                return Err(JsonError::new(format!("duplicate field `{name}`")));
            }
            match read(name, value) {
                Ok(true) => {}
                Ok(false) => return Err(JsonError::new(format!("unknown field `{name}`"))),
                Err(error) => return Err(error.under(name)),
            }
        }
        Ok(())
    }

    /// A required member.
    pub fn req<T: FromJson>(&self, name: &str) -> Result<T, JsonError> {
        match self.get(name) {
            Some(node) => T::read_json(node).map_err(|e| e.under(name)),
            None => {
                self.object()?;
                Err(JsonError::new(format!("missing field `{name}`")))
            }
        }
    }

    /// An optional member: absent or `null` is `None`.
    pub fn opt<T: FromJson>(&self, name: &str) -> Result<Option<T>, JsonError> {
        self.object()?;
        self.get(name)
            .map(|node| T::read_json(node).map_err(|e| e.under(name)))
            .transpose()
    }

    /// A member that defaults when absent or `null`.
    pub fn or_default<T: FromJson + Default>(&self, name: &str) -> Result<T, JsonError> {
        Ok(self.opt(name)?.unwrap_or_default())
    }
}

/// A type read from JSON. Stored records ignore members they do not know (a newer build may
/// add some); options and requests refuse them (see [`Node::fields`]).
pub trait FromJson: Sized {
    /// Reads the value from a parsed node.
    fn read_json(node: &Node<'_>) -> Result<Self, JsonError>;

    /// Parses `text` and reads the value.
    fn from_json(text: &str) -> Result<Self, JsonError> {
        Self::read_json(&parse(text)?)
    }
}

/// A type written as JSON.
pub trait ToJson {
    /// Writes the value.
    fn write_json(&self, out: &mut Writer);

    /// The value as JSON text.
    fn to_json(&self) -> String {
        let mut out = Writer::with_capacity(64);
        self.write_json(&mut out);
        out.finish()
    }
}

impl FromJson for u64 {
    fn read_json(node: &Node<'_>) -> Result<Self, JsonError> {
        node.u64()
    }
}

impl FromJson for u32 {
    fn read_json(node: &Node<'_>) -> Result<Self, JsonError> {
        node.u32()
    }
}

impl FromJson for u16 {
    fn read_json(node: &Node<'_>) -> Result<Self, JsonError> {
        node.u16()
    }
}

impl FromJson for usize {
    fn read_json(node: &Node<'_>) -> Result<Self, JsonError> {
        node.usize()
    }
}

impl FromJson for f64 {
    fn read_json(node: &Node<'_>) -> Result<Self, JsonError> {
        node.f64()
    }
}

impl FromJson for bool {
    fn read_json(node: &Node<'_>) -> Result<Self, JsonError> {
        node.bool()
    }
}

impl FromJson for String {
    fn read_json(node: &Node<'_>) -> Result<Self, JsonError> {
        node.str().map(str::to_owned)
    }
}

impl<T: FromJson> FromJson for Option<T> {
    fn read_json(node: &Node<'_>) -> Result<Self, JsonError> {
        match node.is_null() {
            true => Ok(None),
            false => T::read_json(node).map(Some),
        }
    }
}

impl<T: FromJson> FromJson for Vec<T> {
    fn read_json(node: &Node<'_>) -> Result<Self, JsonError> {
        let items = node.array()?;
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            out.push(T::read_json(item).map_err(|e| e.at(i))?);
        }
        Ok(out)
    }
}

impl ToJson for u64 {
    fn write_json(&self, out: &mut Writer) {
        out.u64(*self);
    }
}

impl ToJson for u32 {
    fn write_json(&self, out: &mut Writer) {
        out.u64(u64::from(*self));
    }
}

impl ToJson for u16 {
    fn write_json(&self, out: &mut Writer) {
        out.u64(u64::from(*self));
    }
}

impl ToJson for usize {
    fn write_json(&self, out: &mut Writer) {
        out.u64(*self as u64);
    }
}

impl ToJson for bool {
    fn write_json(&self, out: &mut Writer) {
        out.bool(*self);
    }
}

impl ToJson for str {
    fn write_json(&self, out: &mut Writer) {
        out.str(self);
    }
}

impl ToJson for String {
    fn write_json(&self, out: &mut Writer) {
        out.str(self);
    }
}

impl<T: ToJson> ToJson for Option<T> {
    fn write_json(&self, out: &mut Writer) {
        match self {
            Some(value) => value.write_json(out),
            None => {
                out.null();
            }
        }
    }
}

impl<T: ToJson + ?Sized> ToJson for &T {
    fn write_json(&self, out: &mut Writer) {
        (**self).write_json(out);
    }
}

impl<T: ToJson> ToJson for Vec<T> {
    fn write_json(&self, out: &mut Writer) {
        self.as_slice().write_json(out);
    }
}

impl<T: ToJson> ToJson for [T] {
    fn write_json(&self, out: &mut Writer) {
        out.begin_array();
        for item in self {
            item.write_json(out);
        }
        out.end_array();
    }
}

/// Writes JSON text. Members and elements are separated as they are added; the caller keeps the
/// shape right (the conversions in [`codec`](super::codec) do, and are tested against
/// serde_json).
#[derive(Debug, Default)]
pub struct Writer {
    out: String,
    /// Whether the next element of the open container is its first (no comma before it).
    first: bool,
    /// Whether a member name was just written, so the next value completes that member.
    after_key: bool,
}

impl Writer {
    /// An empty writer.
    pub fn new() -> Self {
        Writer::with_capacity(0)
    }

    /// An empty writer with room for `bytes` of text.
    pub fn with_capacity(bytes: usize) -> Self {
        Writer {
            out: String::with_capacity(bytes),
            first: true,
            after_key: false,
        }
    }

    /// The text written.
    pub fn finish(self) -> String {
        self.out
    }

    /// Before a value or a member: a comma unless it is the first in its container, nothing
    /// after a member name.
    fn separate(&mut self) {
        if self.after_key {
            self.after_key = false;
        } else if self.first {
            self.first = false;
        } else {
            self.out.push(',');
        }
    }

    /// Starts an object.
    pub fn begin_object(&mut self) -> &mut Self {
        self.separate();
        self.out.push('{');
        self.first = true;
        self
    }

    /// Ends an object.
    pub fn end_object(&mut self) -> &mut Self {
        self.out.push('}');
        self.first = false;
        self
    }

    /// Starts an array.
    pub fn begin_array(&mut self) -> &mut Self {
        self.separate();
        self.out.push('[');
        self.first = true;
        self
    }

    /// Ends an array.
    pub fn end_array(&mut self) -> &mut Self {
        self.out.push(']');
        self.first = false;
        self
    }

    /// Writes a member name; its value is the next thing written.
    pub fn key(&mut self, name: &str) -> &mut Self {
        self.separate();
        push_string(&mut self.out, name);
        self.out.push(':');
        self.after_key = true;
        self
    }

    /// Writes a member: its name and its value.
    pub fn field<T: ToJson + ?Sized>(&mut self, name: &str, value: &T) -> &mut Self {
        self.key(name);
        value.write_json(self);
        self
    }

    /// Writes a member whose value is JSON text (see [`Writer::raw`]).
    pub fn raw_field(&mut self, name: &str, json: &str) -> &mut Self {
        self.key(name).raw(json)
    }

    /// Writes a string value.
    pub fn str(&mut self, value: &str) -> &mut Self {
        self.separate();
        push_string(&mut self.out, value);
        self
    }

    /// Writes an integer value.
    pub fn u64(&mut self, value: u64) -> &mut Self {
        self.separate();
        push_u64(&mut self.out, value);
        self
    }

    /// Writes a boolean value.
    pub fn bool(&mut self, value: bool) -> &mut Self {
        self.raw(if value { "true" } else { "false" })
    }

    /// Writes `null`.
    pub fn null(&mut self) -> &mut Self {
        self.raw("null")
    }

    /// Writes JSON text as it is (a payload, a server's state): the caller vouches for it.
    pub fn raw(&mut self, json: &str) -> &mut Self {
        self.separate();
        self.out.push_str(json);
        self
    }
}

/// The value of a number the parser has checked (see [`Node::f64`]).
fn number_to_f64(text: &str) -> f64 {
    let bytes = text.as_bytes();
    let negative = bytes.first() == Some(&b'-');
    let mut mantissa: u64 = 0;
    let mut digits = 0u32;
    // The power of ten the mantissa is scaled by.
    let mut scale: i64 = 0;
    let mut at = usize::from(negative);
    let mut fraction = false;
    while let Some(&b) = bytes.get(at) {
        match b {
            b'0'..=b'9' => {
                if digits < 19 {
                    mantissa = mantissa * 10 + u64::from(b - b'0');
                    if mantissa != 0 {
                        digits += 1;
                    }
                    if fraction {
                        scale -= 1;
                    }
                } else if !fraction {
                    // Digits past the 19th of the integer part only scale it.
                    scale += 1;
                }
            }
            b'.' => fraction = true,
            _ => break,
        }
        at += 1;
    }
    if matches!(bytes.get(at), Some(b'e' | b'E')) {
        let exponent = &text[at + 1..];
        let (sign, digits) = match exponent.as_bytes().first() {
            Some(b'-') => (-1, &exponent[1..]),
            Some(b'+') => (1, &exponent[1..]),
            _ => (1, exponent),
        };
        // An exponent too large for i64 overflows the f64 anyway.
        let value = digits.parse::<i64>().unwrap_or(i64::MAX / 2).min(100_000);
        scale += sign * value;
    }
    let magnitude = mantissa as f64;
    let value = match scale {
        0 => magnitude,
        // Both operands exact and one rounding: the result is correctly rounded.
        1..=22 if mantissa < 1 << 53 => magnitude * POWERS_OF_TEN[scale as usize],
        -22..=-1 if mantissa < 1 << 53 => magnitude / POWERS_OF_TEN[(-scale) as usize],
        _ => magnitude * 10f64.powi(scale.clamp(-400, 400) as i32),
    };
    if negative { -value } else { value }
}

/// The powers of ten that an `f64` holds exactly.
const POWERS_OF_TEN: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

/// Appends `text` as a JSON string, escaping what must be.
pub fn push_string(out: &mut String, text: &str) {
    out.push('"');
    let mut plain = 0;
    for (i, c) in text.char_indices() {
        let escape = match c {
            '"' => "\\\"",
            '\\' => "\\\\",
            '\n' => "\\n",
            '\r' => "\\r",
            '\t' => "\\t",
            c if (c as u32) < 0x20 => "",
            _ => continue,
        };
        out.push_str(&text[plain..i]);
        if escape.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            let code = c as usize;
            out.push_str("\\u00");
            out.push(HEX[code >> 4] as char);
            out.push(HEX[code & 0xf] as char);
        } else {
            out.push_str(escape);
        }
        plain = i + c.len_utf8();
    }
    out.push_str(&text[plain..]);
    out.push('"');
}

/// Appends `value` in decimal, without the formatting machinery.
pub fn push_u64(out: &mut String, mut value: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    for &d in &digits[at..] {
        out.push(d as char);
    }
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;
    use proptest::prelude::{ProptestConfig, any, prop, prop_assert, prop_assert_eq, proptest};
    use proptest::strategy::{BoxedStrategy, Just, Strategy};

    /// The tree as serde_json's `Value`, to compare with what serde_json reads.
    fn to_serde(node: &Node<'_>) -> serde_json::Value {
        use serde_json::Value as V;
        match &node.value {
            Value::Null => V::Null,
            Value::Bool(b) => V::Bool(*b),
            // Rust's parser is exact; serde_json's default one may be an ulp off.
            Value::Number(text) => match text.parse::<i64>() {
                Ok(n) => V::from(n),
                Err(_) => match text.parse::<u64>() {
                    Ok(n) => V::from(n),
                    Err(_) => V::from(text.parse::<f64>().unwrap()),
                },
            },
            Value::String(s) => V::String(s.to_string()),
            Value::Array(items) => V::Array(items.iter().map(to_serde).collect()),
            Value::Object(members) => V::Object(
                members
                    .iter()
                    .map(|(name, value)| (name.to_string(), to_serde(value)))
                    .collect(),
            ),
        }
    }

    fn any_json() -> BoxedStrategy<serde_json::Value> {
        use serde_json::Value as V;
        let leaf = prop::strategy::Union::new([
            Just(V::Null).boxed(),
            any::<bool>().prop_map(V::Bool).boxed(),
            any::<i64>().prop_map(V::from).boxed(),
            any::<u64>().prop_map(V::from).boxed(),
            (-1e300f64..1e300).prop_map(V::from).boxed(),
            any::<String>().prop_map(V::String).boxed(),
        ]);
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop::strategy::Union::new([
                prop::collection::vec(inner.clone(), 0..6)
                    .prop_map(V::Array)
                    .boxed(),
                prop::collection::btree_map(any::<String>(), inner, 0..6)
                    .prop_map(|m| V::Object(m.into_iter().collect()))
                    .boxed(),
            ])
        })
        .boxed()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn it_reads_what_serde_writes_and_keeps_the_text(value in any_json(), pretty in any::<bool>()) {
            let text = if pretty {
                serde_json::to_string_pretty(&value).unwrap()
            } else {
                serde_json::to_string(&value).unwrap()
            };
            let node = parse(&text).unwrap();
            prop_assert_eq!(to_serde(&node), value);
            prop_assert_eq!(node.raw, text.as_str());
            prop_assert!(is_valid(&text));
        }

        #[test]
        fn it_accepts_exactly_what_serde_accepts(text in "[\\[\\]{}\",:0-9.eE+\\- tfrunlasx\\\\\n]{0,16}") {
            let serde = serde_json::from_str::<serde::de::IgnoredAny>(&text).is_ok();
            prop_assert_eq!(check(&text).is_ok(), serde, "{:?}", text);
            // serde's derive refuses a repeated name; the tree keeps both and `fields` refuses.
            if parse(&text).is_ok() != serde {
                prop_assert!(!serde);
            }
        }

        #[test]
        fn numbers_read_as_rust_reads_them(mantissa in any::<u64>(), exponent in -30i32..30, negative in any::<bool>()) {
            let digits = mantissa.to_string();
            let text = format!("{}{}e{}", if negative { "-" } else { "" }, digits, exponent);
            let exact: f64 = text.parse().unwrap();
            let ours = number_to_f64(&text);
            if mantissa < 1 << 53 && exponent.abs() <= 22 {
                prop_assert_eq!(ours.to_bits(), exact.to_bits(), "{}", text);
            } else {
                prop_assert!(((ours - exact) / exact).abs() < 1e-14, "{} read as {}", text, ours);
            }
        }
    }

    #[test]
    fn the_fractions_options_take_are_exact() {
        for text in [
            "0.25", "1.5", "2", "2.0", "0.1", "0.5", "-0", "1e3", "12.5e-1", "0.000123",
        ] {
            let expected: f64 = text.parse().unwrap();
            assert_eq!(number_to_f64(text).to_bits(), expected.to_bits(), "{text}");
        }
        let node = parse("0.3").unwrap();
        assert_eq!(node.f64().unwrap(), 0.3);
    }

    #[test]
    fn integers_are_integers() {
        assert_eq!(parse("7").unwrap().u64().unwrap(), 7);
        for bad in ["7.0", "-1", "1e3", "18446744073709551616"] {
            assert!(parse(bad).unwrap().u64().is_err(), "{bad}");
        }
        assert!(parse("70000").unwrap().u16().is_err());
        assert_eq!(
            parse(&u64::MAX.to_string()).unwrap().u64().unwrap(),
            u64::MAX
        );
    }

    #[test]
    fn bad_text_is_refused_with_where() {
        for bad in [
            "",
            " ",
            "{",
            "[1,]",
            "{\"a\":1,}",
            "01",
            "1.",
            ".5",
            "-",
            "+1",
            "1e",
            "\"\\x\"",
            "\"\u{1}\"",
            "nul",
            "truex",
            "[1] [2]",
            "{\"a\" 1}",
            "{1:2}",
            "\"abc",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
            assert!(serde_json::from_str::<serde::de::IgnoredAny>(bad).is_err());
        }
        // A lone surrogate is no text (serde_json's `Value` refuses it too, though its
        // `IgnoredAny` skips it): a payload with one is refused at enqueue, not by the server.
        for lone in ["\"\\ud800\"", "\"\\udc00\"", "\"\\ud800\\u0041\""] {
            assert!(parse(lone).is_err() && check(lone).is_err(), "{lone}");
            assert!(serde_json::from_str::<serde_json::Value>(lone).is_err());
        }
        let error = parse("[1, 2, x]").unwrap_err();
        assert!(error.message.contains("byte 7"), "{error}");
        let deep = "[".repeat(200) + &"]".repeat(200);
        assert!(parse(&deep).is_err(), "nesting is bounded");
    }

    #[test]
    fn errors_carry_the_path_to_the_member() {
        let node = parse(r#"{"a":{"b":[0,{"c":"x"}]}}"#).unwrap();
        let items = node.get("a").unwrap().get("b").unwrap().array().unwrap();
        let error = items[1]
            .req::<u64>("c")
            .map_err(|e| e.at(1).under("b").under("a"))
            .unwrap_err();
        assert_eq!(error.path, "a.b[1].c");
        assert_eq!(
            error.to_string(),
            "a.b[1].c: expected a non-negative integer, found a string"
        );
        let repeated = parse(r#"{"a":1,"a":2}"#).unwrap();
        assert!(repeated.fields(|_, _| Ok(true)).is_err());
        assert!(
            parse(r#"{"a":1}"#)
                .unwrap()
                .fields(|_, _| Ok(false))
                .is_err()
        );
    }

    #[test]
    fn the_writer_separates_members_and_elements() {
        let mut out = Writer::new();
        out.begin_object()
            .field("a", &1u64)
            .key("b")
            .begin_array()
            .u64(1)
            .begin_object()
            .end_object()
            .begin_array()
            .end_array()
            .str("x")
            .end_array()
            .raw_field("c", "{\"d\":null}")
            .field("e", &None::<u64>)
            .field("f", &true)
            .end_object();
        assert_eq!(
            out.finish(),
            r#"{"a":1,"b":[1,{},[],"x"],"c":{"d":null},"e":null,"f":true}"#
        );
        let mut text = String::new();
        push_u64(&mut text, 0);
        push_u64(&mut text, u64::MAX);
        assert_eq!(text, format!("0{}", u64::MAX));
    }
}
