//! Reader for the legacy PyTorch serialisation (torch < 1.6): one byte stream holding
//! magic-number pickle, protocol-version pickle, sys-info pickle, the state dict pickle, a pickled
//! list of storage keys, then for each key an 8-byte LE element count and the raw LE data.
//!
//! Each pickle is run through candle's pickle VM; every opcode is checked first for the few
//! inputs on which that VM would panic or allocate unboundedly, so corrupt files yield errors.
use std::collections::HashMap;
use std::io::Cursor;
use std::ops::Range;

use candle_core::pickle::{Object, Stack};

/// `torch.save`'s first pickle: protocol 2, LONG1 of 10 bytes = 0x1950a86a20f9469cfc6c, STOP.
const MAGIC_PICKLE: [u8; 15] = [
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, b'.',
];
const LEGACY_PROTOCOL_VERSION: i64 = 1001;

/// One entry of the state dict.
#[derive(Debug, Clone, PartialEq)]
pub struct LegacyTensor {
    pub name: String,
    pub shape: Vec<usize>,
    /// The values in row-major order, when the storage is a `FloatStorage`; `None` for other
    /// storage types (e.g. the int64 `num_batches_tracked` counters), which are only validated.
    pub f32_values: Option<Vec<f32>>,
}

struct TensorRef {
    name: String,
    storage_key: String,
    offset: usize,
    shape: Vec<usize>,
    strides: Vec<usize>,
}

struct StorageInfo {
    class: String,
    numel: usize,
}

/// Parses a whole legacy checkpoint held in memory. Errors are human-readable reasons (the caller
/// adds the path).
pub fn read_legacy_pth(bytes: &[u8]) -> Result<Vec<LegacyTensor>, String> {
    if !bytes.starts_with(&MAGIC_PICKLE) {
        let hint = if bytes.starts_with(b"PK") {
            " (this is a zip-format checkpoint from torch >= 1.6, not a legacy one)"
        } else {
            ""
        };
        return Err(format!(
            "not a legacy PyTorch checkpoint: the magic number is missing{hint}"
        ));
    }
    let mut pos = MAGIC_PICKLE.len();

    match run_pickle(bytes, &mut pos, "protocol version")? {
        Object::Int(v) if i64::from(v) == LEGACY_PROTOCOL_VERSION => {}
        other => {
            return Err(format!(
                "unsupported protocol version {} (expected {LEGACY_PROTOCOL_VERSION})",
                brief(&other)
            ))
        }
    }
    let sys_info = run_pickle(bytes, &mut pos, "sys info")?;
    let little_endian = dict_entries(sys_info, "sys info")?
        .into_iter()
        .find(|(k, _)| *k == Object::Unicode("little_endian".into()))
        .map(|(_, v)| v);
    if little_endian != Some(Object::Bool(true)) {
        return Err("the checkpoint was not written on a little-endian machine".into());
    }

    let state_dict = run_pickle(bytes, &mut pos, "state dict")?;
    let mut tensors = Vec::new();
    let mut storages: HashMap<String, StorageInfo> = HashMap::new();
    for (key, value) in dict_entries(state_dict, "state dict")? {
        let name = match key {
            Object::Unicode(name) => name,
            other => return Err(format!("state dict key {other:?} is not a string")),
        };
        // `OrderedDict._metadata` (module versions) arrives through BUILD as one more entry.
        if name == "_metadata" {
            continue;
        }
        let (tensor, storage) = tensor_ref(name, value)?;
        match storages.get(&tensor.storage_key) {
            Some(known) if known.class != storage.class || known.numel != storage.numel => {
                return Err(format!(
                    "tensor `{}`: storage {} is described inconsistently",
                    tensor.name, tensor.storage_key
                ))
            }
            Some(_) => {}
            None => {
                storages.insert(tensor.storage_key.clone(), storage);
            }
        }
        tensors.push(tensor);
    }

    let keys = match run_pickle(bytes, &mut pos, "storage key list")? {
        Object::List(keys) => keys,
        other => return Err(format!("storage key list is not a list: {other:?}")),
    };
    let mut storage_bytes: HashMap<String, Range<usize>> = HashMap::new();
    for key in keys {
        let key = match key {
            Object::Unicode(key) => key,
            other => return Err(format!("storage key {other:?} is not a string")),
        };
        let info = storages
            .get(&key)
            .ok_or_else(|| format!("storage {key} is not used by any tensor"))?;
        let count = read_u64(bytes, &mut pos)
            .ok_or_else(|| format!("truncated before the size of storage {key}"))?;
        if count != info.numel as u64 {
            return Err(format!(
                "storage {key} holds {count} elements, its tensors expect {}",
                info.numel
            ));
        }
        let len = info.numel * element_size(&info.class)?;
        let end = pos
            .checked_add(len)
            .filter(|&end| end <= bytes.len())
            .ok_or_else(|| {
                format!(
                    "truncated in storage {key}: needs {len} bytes at offset {pos}, file has {}",
                    bytes.len()
                )
            })?;
        storage_bytes.insert(key, pos..end);
        pos = end;
    }
    if pos != bytes.len() {
        return Err(format!(
            "{} unexpected bytes after the last storage",
            bytes.len() - pos
        ));
    }

    tensors
        .into_iter()
        .map(|t| {
            let range = storage_bytes.get(&t.storage_key).ok_or_else(|| {
                format!("tensor `{}`: storage {} has no data", t.name, t.storage_key)
            })?;
            let info = &storages[&t.storage_key];
            check_in_bounds(&t, info.numel)?;
            let f32_values =
                (info.class == "FloatStorage").then(|| gather_f32(&bytes[range.clone()], &t));
            Ok(LegacyTensor {
                name: t.name,
                shape: t.shape,
                f32_values,
            })
        })
        .collect()
}

/// Runs one pickle starting at `*pos` and leaves `*pos` just after its STOP opcode.
fn run_pickle(bytes: &[u8], pos: &mut usize, what: &str) -> Result<Object, String> {
    let start = *pos;
    let mut cursor = Cursor::new(bytes);
    cursor.set_position(start as u64);
    let mut stack = Stack::empty();
    loop {
        let at = cursor.position() as usize;
        check_opcode(bytes, at).map_err(|e| format!("{what} pickle at byte {at}: {e}"))?;
        match stack.read(&mut cursor) {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => return Err(format!("{what} pickle at byte {at}: {e}")),
        }
    }
    *pos = cursor.position() as usize;
    stack
        .finalize()
        .map_err(|e| format!("{what} pickle at byte {start}: {e}"))
}

/// Rejects the opcode arguments on which candle's VM would panic (a LONG1 wider than i64 overflows
/// a shift) or allocate a buffer the file cannot fill (a BINUNICODE length past the end).
fn check_opcode(bytes: &[u8], at: usize) -> Result<(), String> {
    match bytes.get(at) {
        None => Err("truncated".into()),
        Some(0x8a) => match bytes.get(at + 1) {
            Some(&n) if n <= 8 => Ok(()),
            Some(&n) => Err(format!("integer of {n} bytes is too large")),
            None => Err("truncated".into()),
        },
        Some(b'X') => {
            let len = bytes
                .get(at + 1..at + 5)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
                .ok_or("truncated")?;
            if at + 5 + len > bytes.len() {
                Err(format!("truncated string of {len} bytes"))
            } else {
                Ok(())
            }
        }
        Some(_) => Ok(()),
    }
}

fn dict_entries(obj: Object, what: &str) -> Result<Vec<(Object, Object)>, String> {
    match obj {
        Object::Dict(entries) => Ok(entries),
        other => Err(format!("{what} is not a dict: {}", brief(&other))),
    }
}

/// Decodes `_rebuild_tensor_v2(storage, offset, size, stride, ...)` where `storage` is the
/// persistent id `('storage', torch.<Type>Storage, key, location, numel, view_metadata)`.
fn tensor_ref(name: String, value: Object) -> Result<(TensorRef, StorageInfo), String> {
    let bad = |what: &str| format!("tensor `{name}`: {what}");
    let (callable, args) = match value {
        Object::Reduce { callable, args } => (*callable, *args),
        other => return Err(bad(&format!("not a tensor: {}", brief(&other)))),
    };
    match callable {
        Object::Class {
            module_name,
            class_name,
        } if module_name == "torch._utils" && class_name == "_rebuild_tensor_v2" => {}
        other => return Err(bad(&format!("unsupported constructor {}", brief(&other)))),
    }
    let mut args = match args {
        Object::Tuple(args) if args.len() >= 4 => args.into_iter(),
        other => return Err(bad(&format!("bad arguments {}", brief(&other)))),
    };
    let (storage, offset, size, stride) = match (args.next(), args.next(), args.next(), args.next())
    {
        (Some(a), Some(b), Some(c), Some(d)) => (a, b, c, d),
        _ => return Err(bad("too few arguments")),
    };
    let persistent_id = match storage {
        Object::PersistentLoad(id) => match *id {
            Object::Tuple(fields) if fields.len() >= 5 => fields,
            other => return Err(bad(&format!("bad storage id {}", brief(&other)))),
        },
        other => {
            return Err(bad(&format!(
                "storage is not a persistent id: {}",
                brief(&other)
            )))
        }
    };
    let mut fields = persistent_id.into_iter();
    let (tag, class, key, _location, numel) = match (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) {
        (Some(a), Some(b), Some(c), Some(d), Some(e)) => (a, b, c, d, e),
        _ => return Err(bad("storage id too short")),
    };
    if tag != Object::Unicode("storage".into()) {
        return Err(bad(&format!(
            "persistent id is not a storage: {}",
            brief(&tag)
        )));
    }
    let class = match class {
        Object::Class { class_name, .. } => class_name,
        other => return Err(bad(&format!("bad storage type {}", brief(&other)))),
    };
    element_size(&class).map_err(|e| bad(&e))?;
    let storage_key = match key {
        Object::Unicode(key) => key,
        other => return Err(bad(&format!("bad storage key {}", brief(&other)))),
    };
    let numel = non_negative(numel).ok_or_else(|| bad("bad storage size"))?;
    let offset = non_negative(offset).ok_or_else(|| bad("bad storage offset"))?;
    let shape = usize_tuple(size).ok_or_else(|| bad("bad size"))?;
    let strides = usize_tuple(stride).ok_or_else(|| bad("bad stride"))?;
    if shape.len() != strides.len() {
        return Err(bad(&format!(
            "size {shape:?} and stride {strides:?} differ in rank"
        )));
    }
    Ok((
        TensorRef {
            name,
            storage_key,
            offset,
            shape,
            strides,
        },
        StorageInfo { class, numel },
    ))
}

fn element_size(storage_class: &str) -> Result<usize, String> {
    match storage_class {
        "FloatStorage" | "IntStorage" => Ok(4),
        "DoubleStorage" | "LongStorage" => Ok(8),
        "HalfStorage" | "BFloat16Storage" | "ShortStorage" => Ok(2),
        "ByteStorage" | "CharStorage" | "BoolStorage" => Ok(1),
        other => Err(format!("unsupported storage type {other}")),
    }
}

fn non_negative(obj: Object) -> Option<usize> {
    match obj {
        Object::Int(v) => usize::try_from(v).ok(),
        Object::Long(v) => usize::try_from(v).ok(),
        _ => None,
    }
}

fn usize_tuple(obj: Object) -> Option<Vec<usize>> {
    match obj {
        Object::Tuple(items) => items.into_iter().map(non_negative).collect(),
        _ => None,
    }
}

fn check_in_bounds(t: &TensorRef, storage_numel: usize) -> Result<(), String> {
    if t.shape.contains(&0) {
        return Ok(());
    }
    let last = t
        .shape
        .iter()
        .zip(&t.strides)
        .try_fold(t.offset, |acc, (&n, &s)| {
            (n - 1).checked_mul(s).and_then(|d| acc.checked_add(d))
        });
    match last {
        Some(last) if last < storage_numel => Ok(()),
        _ => Err(format!(
            "tensor `{}`: size {:?}, stride {:?} at offset {} exceed its storage of {storage_numel}",
            t.name, t.shape, t.strides, t.offset
        )),
    }
}

/// Copies a (possibly strided) float view out of its storage in row-major order. Bounds were
/// checked by [`check_in_bounds`].
fn gather_f32(storage: &[u8], t: &TensorRef) -> Vec<f32> {
    let numel: usize = t.shape.iter().product();
    let mut values = Vec::with_capacity(numel);
    let mut index = vec![0usize; t.shape.len()];
    for _ in 0..numel {
        let at = t.offset
            + index
                .iter()
                .zip(&t.strides)
                .map(|(i, s)| i * s)
                .sum::<usize>();
        let b = &storage[at * 4..at * 4 + 4];
        values.push(f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        for d in (0..index.len()).rev() {
            index[d] += 1;
            if index[d] < t.shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
    values
}

fn read_u64(bytes: &[u8], pos: &mut usize) -> Option<u64> {
    let b = bytes.get(*pos..*pos + 8)?;
    *pos += 8;
    Some(u64::from_le_bytes(b.try_into().ok()?))
}

/// A short description of a pickle object for error messages (objects can be huge).
fn brief(obj: &Object) -> String {
    let mut s = format!("{obj:?}");
    if s.len() > 120 {
        let mut cut = 120;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}
