//! Reads JSON as a model writes it, a piece at a time: where a value ends (or that it has not
//! ended yet), and a tool call's name and arguments as soon as they can be known, so the
//! arguments can be streamed while the model is still writing them.
//!
//! The scan is structural (brackets, strings and their escapes); a complete value's text is
//! checked with `serde_json` where its content matters (a name, a call read whole). The
//! arguments text is passed on as the model wrote it — OpenAI's `arguments` is a string the
//! client parses — so what was streamed and what is returned whole are the same characters.

/// How far a JSON value at the start of a text (after whitespace) goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value {
    /// It ends this many bytes in (leading whitespace included).
    Complete(usize),
    /// The text ends inside it.
    Open,
    /// Its brackets do not match, or nothing that starts a value is there: the byte where it
    /// stops being JSON.
    Invalid(usize),
}

/// The index of the first non-whitespace byte of `s` at or after `from`.
pub fn skip_ws(s: &str, from: usize) -> usize {
    let b = s.as_bytes();
    let mut i = from;
    while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// The end (one past the closing quote) of the JSON string whose opening quote is at `start`;
/// `None` while it is open.
pub fn string_end(s: &str, start: usize) -> Option<usize> {
    let b = s.as_bytes();
    let mut i = start + 1;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// Where the JSON value at the start of `s` ends. A bare number or literal is complete only
/// once something follows it, as more digits could still come.
pub fn value(s: &str) -> Value {
    let b = s.as_bytes();
    let start = skip_ws(s, 0);
    let Some(&first) = b.get(start) else { return Value::Open };
    match first {
        b'"' => string_end(s, start).map_or(Value::Open, Value::Complete),
        b'{' | b'[' => {
            let mut closers = Vec::new();
            let mut i = start;
            while i < b.len() {
                match b[i] {
                    b'{' => closers.push(b'}'),
                    b'[' => closers.push(b']'),
                    c @ (b'}' | b']') => {
                        if closers.pop() != Some(c) {
                            return Value::Invalid(i);
                        }
                        if closers.is_empty() {
                            return Value::Complete(i + 1);
                        }
                    }
                    b'"' => match string_end(s, i) {
                        Some(end) => {
                            i = end;
                            continue;
                        }
                        None => return Value::Open,
                    },
                    _ => {}
                }
                i += 1;
            }
            Value::Open
        }
        b'-' | b'0'..=b'9' | b't' | b'f' | b'n' => {
            let len = b[start..].iter().take_while(|c| !matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')).count();
            if start + len == b.len() {
                Value::Open
            } else {
                Value::Complete(start + len)
            }
        }
        _ => Value::Invalid(start),
    }
}

/// A tool call as the model wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Call {
    pub name: String,
    /// The arguments' JSON text (`{}` for a call without any).
    pub arguments: String,
}

/// A call object (`{"name": ..., "arguments": {...}}`) at the start of a text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    /// The whole object, ending this many bytes in.
    Complete(Call, usize),
    /// The text ends inside the object: the name is known and `arguments` holds what has been
    /// written of them so far (without trailing whitespace, which may be the object's own).
    Partial(Call),
    /// Too little has been written to tell.
    Undecided,
    /// Not a call object.
    Invalid,
}

/// The keys a call's arguments go by (`parameters` is Llama 3's).
const ARGUMENT_KEYS: [&str; 2] = ["arguments", "parameters"];

/// Reads a call object at the start of `s`. With the name first (as every format's examples
/// write it) the call is known as soon as its name is, and its arguments grow with the text;
/// other key orders are read once the object is whole.
pub fn object(s: &str) -> Object {
    let b = s.as_bytes();
    let open = skip_ws(s, 0);
    match b.get(open) {
        None => return Object::Undecided,
        Some(b'{') => {}
        Some(_) => return Object::Invalid,
    }
    let key = skip_ws(s, open + 1);
    match key_at(s, key) {
        Key::Open(partial) if "name".starts_with(partial) => Object::Undecided,
        Key::Done("name", after) => name_first(s, after),
        Key::Open(_) | Key::Done(..) => whole(s),
        Key::Missing => {
            if key >= b.len() {
                Object::Undecided
            } else {
                whole(s)
            }
        }
    }
}

/// An object key at `at`: its text, and where its value starts (after the colon).
enum Key<'a> {
    /// The key (undecoded, as object keys in calls are plain) and where its value starts.
    Done(&'a str, usize),
    /// The text ends in the key or before its value; what there is of the key.
    Open(&'a str),
    /// No string there.
    Missing,
}

fn key_at(s: &str, at: usize) -> Key<'_> {
    if s.as_bytes().get(at) != Some(&b'"') {
        return Key::Missing;
    }
    let Some(end) = string_end(s, at) else { return Key::Open(&s[at + 1..]) };
    let key = &s[at + 1..end - 1];
    let colon = skip_ws(s, end);
    match s.as_bytes().get(colon) {
        None => Key::Open(key),
        Some(b':') => {
            let v = skip_ws(s, colon + 1);
            if v >= s.len() {
                Key::Open(key)
            } else {
                Key::Done(key, v)
            }
        }
        Some(_) => Key::Missing,
    }
}

/// A call object whose first key is `name`, its value starting at `at`. Once the name is
/// read the call stands: JSON that breaks after it ends the call where it breaks (the rest is
/// the caller's text), so nothing already streamed is ever taken back.
fn name_first(s: &str, at: usize) -> Object {
    let b = s.as_bytes();
    if b[at] != b'"' {
        return whole(s);
    }
    let Some(end) = string_end(s, at) else { return Object::Undecided };
    let Ok(name) = serde_json::from_str::<String>(&s[at..end]) else { return Object::Invalid };
    let mut call = Call { name, arguments: String::new() };
    let mut pos = end;
    loop {
        let next = skip_ws(s, pos);
        match b.get(next) {
            None => return Object::Partial(call),
            Some(b'}') => return done(call, next + 1),
            Some(b',') => {}
            Some(_) => return done(call, next),
        }
        let key = skip_ws(s, next + 1);
        let (k, v) = match key_at(s, key) {
            Key::Done(k, v) => (k, v),
            Key::Open(_) => return Object::Partial(call),
            Key::Missing if key >= s.len() => return Object::Partial(call),
            Key::Missing => return done(call, key),
        };
        let rest = &s[v..];
        let arguments = ARGUMENT_KEYS.contains(&k) && call.arguments.is_empty();
        match value(rest) {
            Value::Complete(len) => {
                if arguments {
                    call.arguments = match rest.as_bytes()[0] {
                        // Arguments written as a JSON string hold the arguments' text.
                        b'"' => serde_json::from_str::<String>(&rest[..len]).unwrap_or_else(|_| rest[1..len - 1].to_string()),
                        // `null`: none (the call gets `{}`).
                        b'n' => String::new(),
                        _ => rest[..len].to_string(),
                    };
                }
                pos = v + len;
            }
            Value::Open => {
                // An object's (or a list's) arguments grow as written; anything else is read
                // once whole.
                if arguments && (rest.starts_with('{') || rest.starts_with('[')) {
                    call.arguments = rest.trim_end().to_string();
                }
                return Object::Partial(call);
            }
            Value::Invalid(at) => {
                if arguments && !rest.starts_with('"') {
                    call.arguments = rest[..at].trim_end().to_string();
                }
                return done(call, v + at);
            }
        }
    }
}

/// A complete call; one written without arguments gets `{}`.
fn done(mut call: Call, len: usize) -> Object {
    if call.arguments.is_empty() {
        call.arguments = "{}".into();
    }
    Object::Complete(call, len)
}

/// A call object read once it is whole, whatever the order of its keys.
fn whole(s: &str) -> Object {
    let len = match value(s) {
        Value::Complete(len) => len,
        Value::Open => return Object::Undecided,
        Value::Invalid(_) => return Object::Invalid,
    };
    let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(&s[..len]) else {
        return Object::Invalid;
    };
    let Some(serde_json::Value::String(name)) = map.get("name") else { return Object::Invalid };
    let arguments = match ARGUMENT_KEYS.iter().find_map(|k| map.get(*k)) {
        None | Some(serde_json::Value::Null) => "{}".to_string(),
        Some(serde_json::Value::String(text)) => text.clone(),
        Some(v) => v.to_string(),
    };
    Object::Complete(Call { name: name.clone(), arguments }, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, arguments: &str) -> Call {
        Call { name: name.into(), arguments: arguments.into() }
    }

    #[test]
    fn values_end_where_their_brackets_close() {
        assert_eq!(value(r#" {"a": [1, "]"]} tail"#), Value::Complete(16));
        assert_eq!(value(r#"{"a": "x\"}"#), Value::Open);
        assert_eq!(value(r#"{"a": [1}"#), Value::Invalid(8));
        assert_eq!(value("12"), Value::Open);
        assert_eq!(value("12,"), Value::Complete(2));
        assert_eq!(value(r#""a\\" "#), Value::Complete(5));
        assert_eq!(value("  "), Value::Open);
        assert_eq!(value("hello"), Value::Invalid(0));
    }

    #[test]
    fn a_call_is_known_by_its_name_and_its_arguments_grow() {
        let full = r#"{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}"#;
        assert_eq!(object(full), Object::Complete(call("get_weather", r#"{"city": "Paris", "days": [1, 2]}"#), full.len()));
        assert_eq!(object(r#"{"na"#), Object::Undecided);
        assert_eq!(object(r#"{"name": "get_w"#), Object::Undecided);
        assert_eq!(object(r#"{"name": "get_weather""#), Object::Partial(call("get_weather", "")));
        assert_eq!(object(r#"{"name": "get_weather", "argu"#), Object::Partial(call("get_weather", "")));
        assert_eq!(object(r#"{"name": "get_weather", "arguments": {"city": "Pa"#), Object::Partial(call("get_weather", r#"{"city": "Pa"#)));
        // Whitespace that may be the object's own is held back.
        assert_eq!(object("{\"name\": \"f\", \"arguments\": {\"a\": 1} \n"), Object::Partial(call("f", r#"{"a": 1}"#)));
        // Every prefix's arguments begin the whole call's.
        for end in 1..full.len() {
            if let Object::Partial(c) = object(&full[..end]) {
                assert!(r#"{"city": "Paris", "days": [1, 2]}"#.starts_with(&c.arguments), "{end}: {c:?}");
            }
        }
    }

    #[test]
    fn calls_without_arguments_get_an_empty_object() {
        assert_eq!(object(r#"{"name": "now"}"#), Object::Complete(call("now", "{}"), 15));
        assert_eq!(object(r#"{"name": "now", "arguments": {}}"#), Object::Complete(call("now", "{}"), 32));
        assert_eq!(object(r#"{"arguments": null, "name": "now"}"#), Object::Complete(call("now", "{}"), 34));
    }

    #[test]
    fn other_shapes_of_calls_are_read() {
        // Llama 3's key, and arguments given as a JSON string.
        let llama = r#"{"name": "f", "parameters": {"x": 1}}"#;
        assert_eq!(object(llama), Object::Complete(call("f", r#"{"x": 1}"#), llama.len()));
        let string = r#"{"name": "f", "arguments": "{\"x\": 1}"}"#;
        assert_eq!(object(string), Object::Complete(call("f", r#"{"x": 1}"#), string.len()));
        assert_eq!(object(r#"{"name": "f", "arguments": "{\"x\""#), Object::Partial(call("f", "")));
        let reordered = r#"{"arguments": {"x": 1}, "name": "f"}"#;
        assert_eq!(object(reordered), Object::Complete(call("f", r#"{"x":1}"#), reordered.len()));
        assert_eq!(object(r#"{"arguments": {"x": 1}"#), Object::Undecided);
        let extra = r#"{"name": "f", "arguments": {"x": 1}, "id": "7"}"#;
        assert_eq!(object(extra), Object::Complete(call("f", r#"{"x": 1}"#), extra.len()));
    }

    #[test]
    fn what_is_not_a_call_is_invalid() {
        assert_eq!(object("hello"), Object::Invalid);
        assert_eq!(object(r#"{"city": "Paris"}"#), Object::Invalid);
        assert_eq!(object(r#"{"name": 3}"#), Object::Invalid);
        assert_eq!(object(""), Object::Undecided);
    }

    #[test]
    fn json_that_breaks_after_the_name_ends_the_call_where_it_breaks() {
        // What was streamed of such a call stands; the rest is the caller's text.
        assert_eq!(object(r#"{"name": "f" "arguments"}"#), Object::Complete(call("f", "{}"), 13));
        assert_eq!(object(r#"{"name": "f", "arguments": {"a": [1}}"#), Object::Complete(call("f", r#"{"a": [1"#), 35));
        assert_eq!(object(r#"{"name": "f", "arguments": {"a": 1} x"#), Object::Complete(call("f", r#"{"a": 1}"#), 36));
    }
}
