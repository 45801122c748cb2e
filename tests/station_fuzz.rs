//! Property tests of what reaches the station from outside (issue 15): the serial command parser
//! gets arbitrary bytes, every line builder arbitrary text, and the station file loader arbitrary
//! and mutated files. Bounded cases and no persistence files, so that this runs in seconds in
//! `cargo test`.
mod station_decided;

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use station_decided::decided;
use vigil::error::Error;
use vigil::station::protocol::{self, Command, MAX_TEXT};
use vigil::station::{Event, StationConfig, Verdict};

fn cases(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// `line` is printable ASCII (spaces allowed) ending in exactly one CR LF; returns the body.
fn one_printable_line(line: &str) -> Result<&str, TestCaseError> {
    let body = line.strip_suffix("\r\n");
    prop_assert!(body.is_some(), "no CR LF at the end: {line:?}");
    let body = body.unwrap_or_default();
    prop_assert!(
        body.bytes().all(|b| b == b' ' || b.is_ascii_graphic()),
        "not printable ASCII: {line:?}"
    );
    Ok(body)
}

/// Text a reason could hold: words, spaces, control characters (CR LF among them), non-ASCII.
fn text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        4 => "[a-z]{1,12}",
        2 => Just(" ".to_string()),
        1 => prop::sample::select(vec!["\r\n", "\n", "\r", "\t", "\0", "\x1b[2J", "\x7f"])
            .prop_map(String::from),
        1 => any::<char>().prop_map(String::from),
        1 => "[\\x{80}-\\x{10ffff}]{1,3}",
    ];
    prop::collection::vec(piece, 0..120).prop_map(|pieces| pieces.concat())
}

/// What `text` becomes on the wire before any cut.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii() && !c.is_ascii_control() {
                c
            } else {
                '?'
            }
        })
        .collect()
}

/// The free text part of a line: at most [`MAX_TEXT`] characters, and when cut, cut after a word
/// (or hard, for a word that alone is too long) with `...`.
fn check_free_text(original: &str, sent: &str) -> Result<(), TestCaseError> {
    prop_assert!(
        sent.len() <= MAX_TEXT,
        "{} characters: {sent:?}",
        sent.len()
    );
    let clean = printable(original);
    if clean.len() <= MAX_TEXT {
        prop_assert_eq!(sent, clean.as_str());
        return Ok(());
    }
    let kept = sent.strip_suffix("...");
    prop_assert!(kept.is_some(), "cut without ...: {sent:?}");
    let kept = kept.unwrap_or_default();
    prop_assert!(clean.starts_with(kept), "{sent:?} is not a prefix");
    let at_a_space = clean[kept.len()..].starts_with(' ');
    prop_assert!(
        at_a_space || kept.len() == MAX_TEXT - 3,
        "cut mid-word: {sent:?}"
    );
    Ok(())
}

fn check_nak(command: Option<Command>) -> Result<(), TestCaseError> {
    if let Some(Command::Bad { excerpt, reason }) = command {
        let nak = protocol::nak_line(&excerpt, &reason);
        one_printable_line(&nak)?;
        prop_assert!(nak.len() <= 80, "{} bytes: {nak:?}", nak.len());
        prop_assert_eq!(nak.matches("\r\n").count(), 1);
    }
    Ok(())
}

const VALID: [(&str, Command); 5] = [
    ("TRIG", Command::Trigger),
    ("STATUS", Command::Status),
    ("RELOAD", Command::Reload),
    ("PING", Command::Ping),
    ("ACK 42", Command::Ack(42)),
];

/// One random edit of a byte string.
#[derive(Clone, Debug)]
enum Edit {
    Insert(usize, u8),
    Delete(usize),
    Replace(usize, u8),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Insert(i, b)),
        any::<usize>().prop_map(Edit::Delete),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Replace(i, b)),
    ]
}

fn apply(bytes: &mut Vec<u8>, edit: &Edit) {
    match *edit {
        Edit::Insert(i, b) => bytes.insert(i % (bytes.len() + 1), b),
        Edit::Delete(i) if !bytes.is_empty() => {
            bytes.remove(i % bytes.len());
        }
        Edit::Replace(i, b) if !bytes.is_empty() => {
            let i = i % bytes.len();
            bytes[i] = b;
        }
        _ => {}
    }
}

/// `word` in a random case.
fn recase(word: &str, upper: &[bool]) -> String {
    word.chars()
        .zip(upper.iter().cycle())
        .map(|(c, &up)| {
            if up {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect()
}

fn blank() -> impl Strategy<Value = String> {
    "[ \t\r\n]{0,4}"
}

proptest! {
    #![proptest_config(cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic_and_naks_are_short_printable_lines(
        line in prop::collection::vec(any::<u8>(), 0..100)
    ) {
        check_nak(protocol::parse_command(&line))?;
    }

    #[test]
    fn mutated_commands_never_panic_and_naks_are_short_printable_lines(
        which in 0..VALID.len(),
        edits in prop::collection::vec(edit(), 1..6),
    ) {
        let mut line = VALID[which].0.as_bytes().to_vec();
        for e in &edits {
            apply(&mut line, e);
        }
        check_nak(protocol::parse_command(&line))?;
    }

    #[test]
    fn valid_commands_parse_whatever_their_case_and_whitespace(
        which in 0..VALID.len(),
        upper in prop::collection::vec(any::<bool>(), 1..8),
        before in blank(),
        between in "[ \t]{1,3}",
        after in blank(),
    ) {
        let (text, expected) = &VALID[which];
        let words: Vec<String> = text.split(' ').map(|w| recase(w, &upper)).collect();
        let line = format!("{before}{}{after}", words.join(&between));
        prop_assert_eq!(protocol::parse_command(line.as_bytes()), Some(expected.clone()), "{:?}", line);
    }

    #[test]
    fn ack_round_trips_every_id(id in any::<u64>(), upper in any::<bool>()) {
        let word = if upper { "ACK" } else { "ack" };
        prop_assert_eq!(
            protocol::parse_command(format!("{word} {id}\r\n").as_bytes()),
            Some(Command::Ack(id))
        );
    }
}

fn verdict() -> impl Strategy<Value = Verdict> {
    prop::sample::select(vec![Verdict::Ok, Verdict::Ng, Verdict::Err])
}

proptest! {
    #![proptest_config(cases(500))]

    #[test]
    fn result_lines_are_one_printable_line(
        id in any::<u64>(),
        verdict in verdict(),
        score in prop::option::of(any::<f32>()),
        reason in prop::option::of(text()),
        run in any::<u64>(),
        repeat in any::<bool>(),
    ) {
        let mut line = String::new();
        protocol::result_line(&decided(id, verdict, score, reason.as_deref()), run, repeat, &mut line);
        let body = one_printable_line(&line)?;
        let fields: Vec<&str> = body.splitn(7, ' ').collect();
        prop_assert_eq!(fields[0], if repeat { "REP" } else { "RES" });
        prop_assert_eq!(fields[1], id.to_string());
        prop_assert_eq!(fields[2], verdict.as_str());
        prop_assert_eq!(fields[5], run.to_string());
        match reason {
            Some(reason) => check_free_text(&reason, fields[6])?,
            None => prop_assert_eq!(fields.len(), 6),
        }
    }

    #[test]
    fn event_lines_are_one_printable_line(
        which in 0..5usize,
        reason in text(),
        threshold in any::<f32>(),
        run in any::<u64>(),
    ) {
        let (event, prefix) = match which {
            0 => (Event::Ready, "READY "),
            1 => (Event::Fault(reason.clone()), "FAULT "),
            2 => (Event::Reloaded(Ok(threshold)), "ACK RELOAD "),
            3 => (Event::Reloaded(Err(reason.clone())), "NAK RELOAD "),
            _ => (Event::Status(reason.clone()), "STATUS "),
        };
        let line = protocol::event_line(&event, run);
        let body = one_printable_line(&line)?;
        let rest = body.strip_prefix(prefix);
        prop_assert!(rest.is_some(), "{:?} does not start with {:?}", line, prefix);
        let rest = rest.unwrap_or_default();
        match which {
            0 => prop_assert_eq!(rest, run.to_string()),
            1 | 3 | 4 => check_free_text(&reason, rest)?,
            _ => {}
        }
    }

    #[test]
    fn heartbeat_and_lost_lines_are_one_printable_line(
        seq in any::<u64>(),
        ready in any::<bool>(),
        counts in any::<[u64; 3]>(),
        run in any::<u64>(),
        lost in any::<u64>(),
        ids in prop::option::of(any::<(u64, u64)>()),
    ) {
        let hb = protocol::heartbeat_line(seq, ready, counts, run);
        prop_assert_eq!(one_printable_line(&hb)?.split(' ').count(), 7);
        let marker = protocol::lost_line(lost, ids, run);
        let body = one_printable_line(&marker)?;
        let fields: Vec<&str> = body.split(' ').collect();
        prop_assert_eq!(fields.len(), 4);
        prop_assert_eq!(fields[3], run.to_string());
    }

    #[test]
    fn naks_of_any_text_are_one_printable_line(excerpt in text(), reason in text()) {
        let nak = protocol::nak_line(&excerpt, &reason);
        one_printable_line(&nak)?;
    }
}

/// A valid station file as tables of `key = value` lines; the first table is the top level.
type Tables = Vec<(&'static str, Vec<(String, String)>)>;

fn table(name: &'static str, entries: &[(&str, &str)]) -> (&'static str, Vec<(String, String)>) {
    (
        name,
        entries
            .iter()
            .map(|&(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

/// One of several valid station files, so that every source and trigger kind is mutated.
fn valid_tables(source: usize, trigger: usize, counts: bool) -> Tables {
    let source = match source {
        0 => table(
            "source",
            &[
                ("kind", "\"folder\""),
                ("path", "\"parts\""),
                ("loop", "true"),
                ("rate_hz", "5.0"),
            ],
        ),
        1 => table(
            "source",
            &[
                ("kind", "\"synthetic\""),
                ("height", "64"),
                ("width", "64"),
                ("channels", "3"),
                ("seed", "7"),
                ("defect_rate", "0.1"),
                ("count", "10"),
                ("rate_hz", "0.0"),
            ],
        ),
        _ => table(
            "source",
            &[
                ("kind", "\"camera\""),
                ("device", "0"),
                ("width", "640"),
                ("height", "480"),
                ("fps", "30"),
                ("pixel_format", "\"mjpeg\""),
            ],
        ),
    };
    let trigger = match trigger {
        0 => table("trigger", &[("kind", "\"free-run\"")]),
        1 => table("trigger", &[("kind", "\"serial\"")]),
        _ => table(
            "trigger",
            &[
                ("kind", "\"gpio\""),
                ("chip", "\"/dev/gpiochip0\""),
                ("line", "17"),
                ("edge", "\"rising\""),
            ],
        ),
    };
    let delay: &[(&str, &str)] = if counts {
        &[("delay_counts", "120"), ("encoder_line", "22")]
    } else {
        &[("delay_ms", "300")]
    };
    let gpio: Vec<(&str, &str)> = [
        ("chip", "\"/dev/gpiochip0\""),
        ("reject_line", "23"),
        ("ready_line", "24"),
        ("fault_line", "25"),
        ("pulse_ms", "50"),
    ]
    .iter()
    .chain(delay)
    .copied()
    .collect();
    vec![
        table(
            "",
            &[
                ("model", "\"m.safetensors\""),
                ("calibration", "\"c.toml\""),
                ("device", "\"cpu\""),
                ("state_dir", "\"state\""),
            ],
        ),
        source,
        trigger,
        table(
            "input",
            &[
                ("max_width", "4096"),
                ("max_height", "4096"),
                ("max_bytes", "67108864"),
            ],
        ),
        table(
            "decision",
            &[
                ("deadline_ms", "500"),
                ("on_failure", "\"ng\""),
                ("roi", "\"roi.png\""),
                ("reload_poll_ms", "1000"),
            ],
        ),
        table("pipeline", &[("queue", "2")]),
        table(
            "serial",
            &[
                ("port", "\"/dev/ttyS0\""),
                ("baud", "115200"),
                ("data_bits", "8"),
                ("parity", "\"none\""),
                ("stop_bits", "1"),
                ("heartbeat_s", "1.0"),
                ("queue", "100"),
                ("reconnect_ms", "500"),
                ("ack", "true"),
            ],
        ),
        table("json", &[("path", "\"-\"")]),
        table("gpio", &gpio),
        table(
            "audit",
            &[
                ("dir", "\"audit\""),
                ("max_parts", "100"),
                ("max_bytes", "1000000"),
                ("min_free_bytes", "1000"),
            ],
        ),
        table("status", &[("interval_s", "10.0")]),
    ]
}

fn render(tables: &Tables) -> String {
    let mut text = String::new();
    for (name, entries) in tables {
        if !name.is_empty() {
            text.push_str(&format!("[{name}]\n"));
        }
        for (key, value) in entries {
            text.push_str(&format!("{key} = {value}\n"));
        }
    }
    text
}

/// A TOML basic string holding `text`.
fn toml_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn toml_float(x: f64) -> String {
    match x {
        x if x.is_nan() => "nan".into(),
        x if x.is_infinite() => if x > 0.0 { "inf" } else { "-inf" }.into(),
        // Debug prints `1.0` and `1e300`, both valid TOML floats.
        x => format!("{x:?}"),
    }
}

/// Any TOML value, well-formed so that an error is about the value and not the file's syntax.
fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        prop::sample::select(vec![0i64, 1, -1, 2, 7, 8, 49, 50, 1000, 65_536, 1 << 40])
            .prop_map(|n| n.to_string()),
        Just("100000000000000000000".to_string()),
        any::<f64>().prop_map(toml_float),
        prop::sample::select(vec![
            0.0,
            -0.0,
            0.01,
            1e300,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY
        ])
        .prop_map(toml_float),
        any::<bool>().prop_map(|b| b.to_string()),
        text().prop_map(|t| toml_string(&t)),
        prop::sample::select(vec![
            "folder",
            "synthetic",
            "camera",
            "free-run",
            "serial",
            "gpio",
            "ng",
            "err",
            "cuda",
            "none",
            "odd",
            "falling",
            "gray",
            "-",
            "",
        ])
        .prop_map(toml_string),
        Just("[]".to_string()),
        Just("[1, 2]".to_string()),
        Just("{ a = 1 }".to_string()),
        Just("1979-05-27T07:32:00Z".to_string()),
    ]
}

/// Keys of every table (so that an added key can be a real one in the wrong place, or a
/// duplicate), and some that exist nowhere.
fn key_name() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "model",
            "kind",
            "path",
            "line",
            "chip",
            "edge",
            "loop",
            "rate_hz",
            "width",
            "height",
            "count",
            "fps",
            "queue",
            "port",
            "ack",
            "delay_ms",
            "delay_counts",
            "encoder_line",
            "ready_line",
            "max_bytes",
            "min_free_bytes",
            "state_dir",
            "roi",
            "interval_s",
            "serial",
            "source",
        ])
        .prop_map(String::from),
        "zz_[a-z_]{1,10}",
    ]
}

/// How a valid file is spoiled: one value replaced, or one key added.
#[derive(Clone, Debug)]
enum Spoil {
    Replace {
        entry: usize,
        value: String,
    },
    Add {
        table: usize,
        key: String,
        value: String,
    },
}

fn spoil() -> impl Strategy<Value = Spoil> {
    prop_oneof![
        (any::<usize>(), toml_value()).prop_map(|(entry, value)| Spoil::Replace { entry, value }),
        (any::<usize>(), key_name(), toml_value()).prop_map(|(table, key, value)| Spoil::Add {
            table,
            key,
            value
        }),
    ]
}

/// Spoils `tables`; returns the table and key touched.
fn apply_spoil(tables: &mut Tables, spoil: &Spoil) -> (&'static str, String) {
    match spoil {
        Spoil::Replace { entry, value } => {
            let slots: Vec<(usize, usize)> = tables
                .iter()
                .enumerate()
                .flat_map(|(t, (_, entries))| (0..entries.len()).map(move |e| (t, e)))
                .collect();
            let (t, e) = slots[entry % slots.len()];
            tables[t].1[e].1.clone_from(value);
            (tables[t].0, tables[t].1[e].0.clone())
        }
        Spoil::Add { table, key, value } => {
            let t = table % tables.len();
            tables[t].1.push((key.clone(), value.clone()));
            (tables[t].0, key.clone())
        }
    }
}

/// Every error of the loader is a config error with a named field.
fn config_error(
    result: vigil::error::Result<StationConfig>,
) -> Result<Option<(String, String)>, TestCaseError> {
    match result {
        Ok(_) => Ok(None),
        Err(Error::Config { field, reason }) => {
            prop_assert!(!field.is_empty(), "no field: {reason}");
            Ok(Some((field, reason)))
        }
        Err(other) => Err(TestCaseError::fail(format!("not a config error: {other}"))),
    }
}

fn toml_soup() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        prop::sample::select(vec![
            "\n", " ", "=", "[", "]", "[[", "\"", "'", ".", ",", "{", "}", "#", "model", "kind",
            "[source]", "[serial]", "queue", "1", "-1", "1e400", "nan", "true", "\"\"\"",
        ])
        .prop_map(String::from),
        any::<char>().prop_map(String::from),
        "[a-z_]{1,8}",
    ];
    prop::collection::vec(piece, 0..60).prop_map(|pieces| pieces.concat())
}

proptest! {
    #![proptest_config(cases(300))]

    #[test]
    fn arbitrary_station_files_give_named_errors(text in prop_oneof![any::<String>(), toml_soup(), text()]) {
        config_error(StationConfig::parse(&text, "station.toml"))?;
    }

    #[test]
    fn a_spoiled_key_is_named_in_the_error(
        source in 0..3usize,
        trigger in 0..3usize,
        counts in any::<bool>(),
        spoil in spoil(),
    ) {
        let mut tables = valid_tables(source, trigger, counts);
        StationConfig::parse(&render(&tables), "station.toml")
            .map_err(|e| TestCaseError::fail(format!("the valid file is refused: {e}")))?;
        let (table, key) = apply_spoil(&mut tables, &spoil);
        let text = render(&tables);
        let Some((field, reason)) = config_error(StationConfig::parse(&text, "station.toml"))? else {
            return Ok(());
        };
        let dotted = if table.is_empty() { key.clone() } else { format!("{table}.{key}") };
        // A new `kind` changes which keys the table may hold: the error names one of those, or a
        // key the new kind needs and the table lacks (serde's "missing field `line`").
        let names_a_key_of_the_table = key == "kind"
            && (reason.contains("missing field")
                || tables
                    .iter()
                    .filter(|(name, _)| *name == table)
                    .flat_map(|(_, entries)| entries)
                    .any(|(k, _)| reason.contains(&format!("`{k}`"))));
        prop_assert!(
            field == dotted || reason.contains(&key) || names_a_key_of_the_table,
            "{:?} on {}: field `{}`: {}\n{}", spoil, dotted, field, reason, text
        );
    }
}
