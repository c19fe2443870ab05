//! The placement inputs as users write them: sizes (`40GiB`, accelerate's
//! `convert_file_size_to_int`), `max_memory` lists (`0=40GiB,cpu=64GiB`) and dtype names.

use super::*;

/// Parses a size the way accelerate's `convert_file_size_to_int` does.
///
/// `GiB`/`MiB`/`KiB` are powers of two, `GB`/`MB`/`KB` powers of ten, all case-insensitive,
/// except that a string ending in a lowercase `b` (`"8Gb"`, `"8gb"`) counts bits and is divided
/// by eight. The number may be fractional and is truncated after scaling. A bare integer is a
/// byte count (accelerate's `int` input).
pub fn parse_size(s: &str) -> Result<u64, PlacementError> {
    let invalid = || PlacementError::InvalidSize { value: s.to_string() };
    let trimmed = s.trim();
    if !trimmed.is_empty() && trimmed.bytes().all(|b| b.is_ascii_digit()) {
        return trimmed.parse::<u64>().map_err(|_| invalid());
    }
    let ends_with =
        |suffix: &str| s.len() >= suffix.len() && s.get(s.len() - suffix.len()..).is_some_and(|tail| tail.eq_ignore_ascii_case(suffix));
    // Same precedence as accelerate, so "GiB" is never read as "...B" with a stray "i".
    let (unit_len, scale, bits_allowed) = if ends_with("GIB") {
        (3, (1u64 << 30) as f64, false)
    } else if ends_with("MIB") {
        (3, (1u64 << 20) as f64, false)
    } else if ends_with("KIB") {
        (3, (1u64 << 10) as f64, false)
    } else if ends_with("GB") {
        (2, 1e9, true)
    } else if ends_with("MB") {
        (2, 1e6, true)
    } else if ends_with("KB") {
        (2, 1e3, true)
    } else {
        return Err(invalid());
    };
    let number = s.get(..s.len() - unit_len).ok_or_else(invalid)?;
    let value = parse_python_float(number).ok_or_else(invalid)? * scale;
    // Python's int() truncates toward zero; infinities and NaN raise there too.
    if !value.is_finite() {
        return Err(invalid());
    }
    let truncated = value.trunc();
    if !(0.0..18_446_744_073_709_551_616.0).contains(&truncated) {
        return Err(invalid());
    }
    let bytes = truncated as u64;
    if bits_allowed && s.ends_with('b') {
        Ok(bytes / 8)
    } else {
        Ok(bytes)
    }
}

/// Mirrors Python's `float()` on text: surrounding whitespace and digit-separating underscores.
fn parse_python_float(text: &str) -> Option<f64> {
    let t = text.trim();
    if t.contains('_') {
        let bytes = t.as_bytes();
        for (i, b) in bytes.iter().enumerate() {
            if *b == b'_' {
                let before = i.checked_sub(1).and_then(|j| bytes.get(j));
                let after = bytes.get(i + 1);
                if !(before.is_some_and(u8::is_ascii_digit) && after.is_some_and(u8::is_ascii_digit)) {
                    return None;
                }
            }
        }
        t.replace('_', "").parse().ok()
    } else {
        t.parse().ok()
    }
}

/// Parses `"0=40GiB,1=40GiB,cpu=64GiB"` into budgets, in the order written.
pub fn parse_max_memory(s: &str) -> Result<Vec<(Device, u64)>, PlacementError> {
    if s.trim().is_empty() {
        return Err(PlacementError::EmptyMaxMemory);
    }
    let mut out: Vec<(Device, u64)> = Vec::new();
    for raw in s.split(',') {
        let item = raw.trim();
        let bad = |reason: String| PlacementError::InvalidMaxMemoryItem { item: item.to_string(), reason };
        let (dev, size) = item.split_once('=').ok_or_else(|| bad("expected DEVICE=SIZE, e.g. 0=40GiB or cpu=64GiB".into()))?;
        let device = dev.trim().parse::<Device>().map_err(|e| bad(e.to_string()))?;
        let bytes = parse_size(size.trim()).map_err(|e| bad(e.to_string()))?;
        if out.iter().any(|(d, _)| *d == device) {
            return Err(PlacementError::DuplicateDevice { device });
        }
        out.push((device, bytes));
    }
    Ok(out)
}

/// Bytes per element of a floating-point dtype name (`torch.` prefix allowed).
pub fn dtype_bytes(dtype: &str) -> Result<u64, PlacementError> {
    match dtype.parse::<crate::dtype::Dtype>() {
        Ok(d @ (crate::dtype::Dtype::F32 | crate::dtype::Dtype::Bf16 | crate::dtype::Dtype::F16)) => {
            Ok(d.resolve(None, false).size_in_bytes() as u64)
        }
        _ => Err(PlacementError::UnsupportedDtype(dtype.to_string())),
    }
}
