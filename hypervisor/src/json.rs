//! Replies as data: a small value tree that renders either as one line of
//! JSON (machine mode) or as `key: value` lines (human mode).
//!
//! The console never builds JSON by hand; every command returns an [`Obj`].

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;

/// A JSON value. Object keys are static: they are part of the console's
/// documented reply format.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `null`
    Null,
    /// `true` / `false`
    Bool(bool),
    /// An unsigned integer.
    U64(u64),
    /// A signed integer.
    I64(i64),
    /// A string, escaped on output.
    Str(String),
    /// An array.
    Arr(Vec<Value>),
    /// A nested object.
    Obj(Obj),
}

/// A JSON object with fields in insertion order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Obj(pub Vec<(&'static str, Value)>);

impl Obj {
    /// An empty object.
    pub fn new() -> Self {
        Obj(Vec::new())
    }

    /// Adds a field, builder style.
    pub fn with(mut self, key: &'static str, value: impl Into<Value>) -> Self {
        self.0.push((key, value.into()));
        self
    }

    /// Looks a field up (used by tests and by human rendering).
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// Renders as one line of JSON.
    pub fn to_json(&self) -> String {
        let mut out = String::new();
        write_obj(&mut out, self);
        out
    }
}

macro_rules! from_int {
    ($variant:ident, $wide:ty: $($t:ty),*) => {$(
        impl From<$t> for Value {
            fn from(v: $t) -> Self {
                Value::$variant(<$wide>::from(v))
            }
        }
    )*};
}
from_int!(U64, u64: u8, u16, u32, u64);
from_int!(I64, i64: i8, i16, i32, i64);

impl From<usize> for Value {
    fn from(v: usize) -> Self {
        Value::U64(v as u64)
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Str(String::from(v))
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Str(v)
    }
}
impl From<Obj> for Value {
    fn from(v: Obj) -> Self {
        Value::Obj(v)
    }
}
impl<T: Into<Value>> From<Vec<T>> for Value {
    fn from(v: Vec<T>) -> Self {
        Value::Arr(v.into_iter().map(Into::into).collect())
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// Writes `s` as a JSON string literal, escaping quotes, backslashes and
/// control characters.
pub fn write_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn write_value(out: &mut String, v: &Value) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::U64(n) => {
            let _ = write!(out, "{n}");
        }
        Value::I64(n) => {
            let _ = write!(out, "{n}");
        }
        Value::Str(s) => write_str(out, s),
        Value::Arr(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(out, item);
            }
            out.push(']');
        }
        Value::Obj(o) => write_obj(out, o),
    }
}

fn write_obj(out: &mut String, o: &Obj) {
    out.push('{');
    for (i, (k, v)) in o.0.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_str(out, k);
        out.push(':');
        write_value(out, v);
    }
    out.push('}');
}

/// Renders a value for people: strings without quotes, nested objects inline
/// as `key=value` pairs.
pub fn human_value(out: &mut String, v: &Value) {
    match v {
        Value::Str(s) => out.push_str(s),
        Value::Null => out.push('-'),
        Value::Arr(items) => {
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                human_value(out, item);
            }
        }
        Value::Obj(o) => {
            for (i, (k, v)) in o.0.iter().enumerate() {
                if i > 0 {
                    out.push(' ');
                }
                out.push_str(k);
                out.push('=');
                human_value(out, v);
            }
        }
        other => write_value(out, other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn renders_nested_values_on_one_line() {
        let o = Obj::new()
            .with("ok", true)
            .with("n", 42u32)
            .with("neg", -3i32)
            .with("none", Option::<u32>::None)
            .with("list", vec![1u8, 2])
            .with("inner", Obj::new().with("s", "x"));
        assert_eq!(o.to_json(), r#"{"ok":true,"n":42,"neg":-3,"none":null,"list":[1,2],"inner":{"s":"x"}}"#);
    }

    #[test]
    fn escapes_quotes_backslashes_and_control_bytes() {
        let o = Obj::new().with("e", "a\"b\\c\nd\u{1}\u{7f}");
        assert_eq!(o.to_json(), r#"{"e":"a\"b\\c\nd\u0001\u007f"}"#);
        assert!(!o.to_json().contains('\n'));
    }

    #[test]
    fn human_rendering_is_plain() {
        let mut s = String::new();
        human_value(&mut s, &Obj::new().with("a", "b").with("c", vec![1u8, 2]).into());
        assert_eq!(s, "a=b c=1, 2");
    }
}
