//! Python's ways of printing values, for templates written against jinja2: `str()`, `repr()`,
//! `str.title()`, and `json.dumps` as transformers' `tojson` filter calls it.

use minijinja::value::{Kwargs, Rest, Value, ValueKind, ValueOrKwargs};
use minijinja::{ErrorKind, Output};
use std::fmt::Write as _;

pub(super) fn write_str_of(out: &mut Output, value: &Value) -> std::fmt::Result {
    match value.as_str() {
        Some(s) => out.write_str(s),
        None if value.is_undefined() => Ok(()),
        None => out.write_str(&python_str(value)),
    }
}

/// Python's `str.title`: a letter after a letter is lowered, any other letter raised.
pub(super) fn python_title(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut after_letter = false;
    for c in s.chars() {
        let cased = c.is_lowercase() || c.is_uppercase();
        if !cased {
            out.push(c);
        } else if after_letter {
            out.extend(c.to_lowercase());
        } else {
            out.extend(c.to_uppercase());
        }
        after_letter = cased;
    }
    out
}

/// `str(value)` as Python prints it: strings as they are, everything else as its `repr`.
pub(super) fn python_str(value: &Value) -> String {
    match value.as_str() {
        Some(s) => s.to_string(),
        None if value.is_undefined() => String::new(),
        None => {
            let mut out = String::new();
            python_repr(value, &mut out);
            out
        }
    }
}

/// Python's `repr`: `'text'`, `True`, `None`, `1.0`, `[1, 'a']`, `{'k': 'v'}`, `(1,)`.
pub(super) fn python_repr(value: &Value, out: &mut String) {
    match value.kind() {
        ValueKind::Undefined => {}
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number if !value.is_integer() => match f64::try_from(value.clone()) {
            Ok(x) if x.is_nan() => out.push_str("nan"),
            Ok(x) if x.is_infinite() => out.push_str(if x < 0.0 { "-inf" } else { "inf" }),
            Ok(x) => out.push_str(&float_repr(x)),
            Err(_) => {
                let _ = write!(out, "{value}");
            }
        },
        ValueKind::String => string_repr(value.as_str().unwrap_or_default(), out),
        ValueKind::Seq | ValueKind::Iterable => {
            let tuple = value.is_tuple();
            out.push(if tuple { '(' } else { '[' });
            let mut n = 0;
            for (i, item) in value.try_iter().into_iter().flatten().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                python_repr(&item, out);
                n += 1;
            }
            out.push_str(match (tuple, n) {
                (true, 1) => ",)",
                (true, _) => ")",
                _ => "]",
            });
        }
        ValueKind::Map => {
            out.push('{');
            let pairs = value.as_object().and_then(|o| o.try_iter_pairs());
            for (i, (k, v)) in pairs.into_iter().flatten().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                python_repr(&k, out);
                out.push_str(": ");
                python_repr(&v, out);
            }
            out.push('}');
        }
        _ => {
            let _ = write!(out, "{value}");
        }
    }
}

/// Python's `repr` of a string: single quotes unless the text has some and no double ones;
/// control and invisible characters escaped.
pub(super) fn string_repr(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if !is_printable(c) => {
                let n = c as u32;
                let _ = match n {
                    0..=0xff => write!(out, "\\x{n:02x}"),
                    0x100..=0xffff => write!(out, "\\u{n:04x}"),
                    _ => write!(out, "\\U{n:08x}"),
                };
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// Python's `str.isprintable` for one character, for the characters text really holds: not
/// controls, format characters, separators other than the space, surrogates or private use.
pub(super) fn is_printable(c: char) -> bool {
    !matches!(c as u32,
        0..=0x1f | 0x7f..=0xa0 | 0xad | 0x600..=0x605 | 0x61c | 0x6dd | 0x70f | 0x1680 | 0x180e
        | 0x2000..=0x200f | 0x2028..=0x202f | 0x205f..=0x2064 | 0x2066..=0x206f | 0x3000
        | 0xd800..=0xf8ff | 0xfeff | 0xfff9..=0xfffb | 0xe0001 | 0xe0020..=0xe007f
        | 0xf0000..=0x10ffff)
}

/// Python's `repr(float)` for a finite value: the shortest digits that round-trip, positional
/// from 1e-4 up to below 1e16, otherwise `1e-05` / `1.5e+16`.
pub(super) fn float_repr(x: f64) -> String {
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.to_string();
    }
    // Rust's `{:e}` gives the same shortest round-trip digits as Python's repr.
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("{:e} has an integer exponent");
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if !(-4..16).contains(&exp) {
        let rest = if digits.len() > 1 { format!(".{}", &digits[1..]) } else { String::new() };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{}{rest}e{esign}{:02}", &digits[..1], exp.abs())
    } else if exp >= 0 {
        let point = exp as usize + 1;
        if digits.len() <= point {
            format!("{sign}{digits}{}.0", "0".repeat(point - digits.len()))
        } else {
            format!("{sign}{}.{}", &digits[..point], &digits[point..])
        }
    } else {
        format!("{sign}0.{}{digits}", "0".repeat((-exp - 1) as usize))
    }
}

/// Options of Python's `json.dumps` that transformers' `tojson` exposes.
pub(super) struct JsonStyle {
    ensure_ascii: bool,
    indent: Option<String>,
    item_separator: String,
    key_separator: String,
    sort_keys: bool,
}

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`:
/// `json.dumps` with those arguments, positional or by keyword. Unlike jinja2's own filter (and
/// minijinja's) it escapes no HTML and keeps `, ` / `: ` separators.
pub(super) fn tojson(args: Rest<ValueOrKwargs>) -> Result<Value, minijinja::Error> {
    let bad = |m: String| minijinja::Error::new(ErrorKind::InvalidOperation, m);
    let mut values = args.into_values();
    let kwargs = match values.last() {
        Some(v) if v.is_kwargs() => Kwargs::try_from(values.pop().expect("checked"))?,
        _ => Kwargs::try_from(Value::UNDEFINED)?,
    };
    if values.is_empty() {
        return Err(minijinja::Error::new(ErrorKind::MissingArgument, "tojson needs a value"));
    }
    let value = values.remove(0);
    const PARAMS: [&str; 4] = ["ensure_ascii", "indent", "separators", "sort_keys"];
    if values.len() > PARAMS.len() {
        return Err(minijinja::Error::new(ErrorKind::TooManyArguments, "tojson takes at most 4 arguments after the value"));
    }
    let mut params: [Option<Value>; 4] = Default::default();
    for (i, v) in values.into_iter().enumerate() {
        params[i] = Some(v);
    }
    for (i, name) in PARAMS.iter().enumerate() {
        if let Some(v) = kwargs.get::<Option<Value>>(name)? {
            if params[i].is_some() {
                return Err(bad(format!("tojson got multiple values for argument {name:?}")));
            }
            params[i] = Some(v);
        }
    }
    kwargs.assert_all_used()?;
    let [ensure_ascii, indent, separators, sort_keys] = params;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) if v.kind() == ValueKind::String => Some(v.as_str().unwrap_or_default().to_string()),
        Some(v) if v.kind() == ValueKind::Bool => Some(if v.is_true() { " " } else { "" }.to_string()),
        Some(v) if v.is_integer() => Some(" ".repeat(i64::try_from(v)?.max(0) as usize)),
        Some(v) => return Err(bad(format!("tojson: indent must be an integer or a string, not {}", v.kind()))),
    };
    let (item_separator, key_separator) = match separators {
        Some(v) if !v.is_none() => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] if a.as_str().is_some() && b.as_str().is_some() => {
                    (a.as_str().unwrap_or_default().to_string(), b.as_str().unwrap_or_default().to_string())
                }
                _ => return Err(bad("tojson: separators must be a pair of strings".into())),
            }
        }
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let style = JsonStyle {
        ensure_ascii: ensure_ascii.is_some_and(|v| v.is_true()),
        indent,
        item_separator,
        key_separator,
        sort_keys: sort_keys.is_some_and(|v| v.is_true()),
    };
    let mut out = String::new();
    json_dumps(&value, &style, 0, &mut out)?;
    Ok(Value::from(out))
}

/// Python's `json.dumps` of a template value, written to `out`.
pub(super) fn json_dumps(value: &Value, style: &JsonStyle, level: usize, out: &mut String) -> Result<(), minijinja::Error> {
    let not_serializable = |what: &str| {
        minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: an object of type {what} is not JSON serializable"))
    };
    match value.kind() {
        ValueKind::Undefined => return Err(not_serializable("Undefined")),
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number if value.is_integer() => {
            let _ = write!(out, "{value}");
        }
        ValueKind::Number => {
            let x = f64::try_from(value.clone())?;
            out.push_str(&if x.is_nan() {
                "NaN".to_string()
            } else if x.is_infinite() {
                if x < 0.0 { "-Infinity" } else { "Infinity" }.to_string()
            } else {
                float_repr(x)
            });
        }
        ValueKind::String => json_string(value.as_str().unwrap_or_default(), style.ensure_ascii, out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            json_container(out, style, level, '[', ']', items.len(), |i, level, out| json_dumps(&items[i], style, level, out))?;
        }
        ValueKind::Map => {
            let mut pairs: Vec<(String, Value)> = Vec::new();
            let iter = value.as_object().and_then(|o| o.try_iter_pairs());
            for (k, v) in iter.into_iter().flatten() {
                let key = match k.kind() {
                    ValueKind::String => k.as_str().unwrap_or_default().to_string(),
                    ValueKind::None => "null".to_string(),
                    ValueKind::Bool | ValueKind::Number => {
                        let mut s = String::new();
                        json_dumps(&k, style, level, &mut s)?;
                        s
                    }
                    other => {
                        return Err(minijinja::Error::new(
                            ErrorKind::InvalidOperation,
                            format!("tojson: keys must be str, int, float, bool or None, not {other}"),
                        ))
                    }
                };
                pairs.push((key, v));
            }
            if style.sort_keys {
                pairs.sort_by(|a, b| a.0.cmp(&b.0));
            }
            json_container(out, style, level, '{', '}', pairs.len(), |i, level, out| {
                json_string(&pairs[i].0, style.ensure_ascii, out);
                out.push_str(&style.key_separator);
                json_dumps(&pairs[i].1, style, level, out)
            })?;
        }
        ValueKind::Invalid => {
            // The value carries an error; surfacing it is what any use of it does.
            value.try_iter()?;
            return Err(not_serializable("invalid"));
        }
        other => return Err(not_serializable(&other.to_string())),
    }
    Ok(())
}

/// A JSON array or object, laid out as Python's encoder lays it out with or without `indent`.
pub(super) fn json_container(
    out: &mut String,
    style: &JsonStyle,
    level: usize,
    open: char,
    close: char,
    len: usize,
    mut item: impl FnMut(usize, usize, &mut String) -> Result<(), minijinja::Error>,
) -> Result<(), minijinja::Error> {
    out.push(open);
    if len == 0 {
        out.push(close);
        return Ok(());
    }
    let inner = level + 1;
    let newline = |out: &mut String, level: usize| {
        if let Some(indent) = &style.indent {
            out.push('\n');
            out.push_str(&indent.repeat(level));
        }
    };
    newline(out, inner);
    for i in 0..len {
        if i > 0 {
            out.push_str(&style.item_separator);
            newline(out, inner);
        }
        item(i, inner, out)?;
    }
    newline(out, level);
    out.push(close);
    Ok(())
}

/// A JSON string as Python's `json.dumps` writes it: `\n`, `\t`, ... and `\u00XX` for other
/// controls; with `ensure_ascii`, `\uXXXX` (surrogate pairs above U+FFFF) for all but printable
/// ASCII.
pub(crate) fn json_string(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && !(' '..='~').contains(&c) => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{u:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}
