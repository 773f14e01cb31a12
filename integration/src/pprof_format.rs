//! pprof files read back by a decoder we did not write: the `pprof-format` npm package (pure
//! JavaScript, what Datadog's and Google's Node profilers encode with), run by node from
//! `.cache/pprof-format/` (scripts/install-deps.sh installs it there).

use std::path::{Path, PathBuf};
use std::process::Command;

/// One decoded sample: its frames' function names (leaf first; `""` for a frame without a
/// function), its values and its labels (`key=value`, numbers as decimal).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct DecodedSample {
    pub functions: Vec<String>,
    pub values: Vec<i64>,
    pub labels: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct DecodedProfile {
    /// `[type, unit]` per value.
    pub sample_types: Vec<(String, String)>,
    pub samples: Vec<DecodedSample>,
    /// Each mapping's file name and build id.
    pub mappings: Vec<(String, String)>,
}

impl DecodedProfile {
    /// The sum of every sample's first value.
    pub fn total(&self) -> i64 {
        self.samples.iter().map(|s| s.values[0]).sum()
    }
}

fn module_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache/pprof-format/node_modules")
}

const DECODE_JS: &str = r#"
const fs = require('fs');
const zlib = require('zlib');
const { Profile } = require('pprof-format');
let bytes = fs.readFileSync(process.argv[1]);
if (bytes[0] === 0x1f && bytes[1] === 0x8b) bytes = zlib.gunzipSync(bytes);
const p = Profile.decode(bytes);
const s = (i) => p.stringTable.strings[Number(i)];
const fn = new Map(p.function.map((f) => [Number(f.id), s(f.name)]));
const loc = new Map(p.location.map((l) => [Number(l.id), l]));
console.log(JSON.stringify({
  sample_types: p.sampleType.map((t) => [s(t.type), s(t.unit)]),
  samples: p.sample.map((x) => ({
    functions: x.locationId.map((id) => {
      const l = loc.get(Number(id));
      return l && l.line.length ? fn.get(Number(l.line[0].functionId)) : '';
    }),
    values: x.value.map(Number),
    labels: x.label.map((l) => s(l.key) + '=' + (Number(l.str) ? s(l.str) : String(l.num))),
  })),
  mappings: p.mapping.map((m) => [s(m.filename), s(m.buildId)]),
}));
"#;

/// Decodes the pprof file at `path` (gzip-compressed or not) with `pprof-format`.
pub fn decode(path: &Path) -> DecodedProfile {
    let modules = module_dir();
    assert!(
        modules.join("pprof-format").exists(),
        "pprof-format is not installed in {}: run scripts/install-deps.sh",
        modules.display()
    );
    let out = Command::new("node")
        .env("NODE_PATH", &modules)
        .arg("-e")
        .arg(DECODE_JS)
        .arg(path)
        .output()
        .expect("node runs");
    assert!(
        out.status.success(),
        "pprof-format could not decode {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the decoder's JSON")
}
