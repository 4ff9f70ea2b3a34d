//! One figure of the report and the typed builder the paths fill in.

use crate::vm::probe::Accel;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Which table (and chart) a row belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Group {
    Start,
    Roundtrip,
    Compute,
    Memory,
    Size,
    Density,
}

impl Group {
    /// Every group, in the order the report shows them, with its title.
    pub const TABLES: [(Group, &'static str); 6] = [
        (Group::Start, "Start-up"),
        (Group::Roundtrip, "Null privileged operation round trip"),
        (Group::Compute, "Compute"),
        (Group::Memory, "Memory"),
        (Group::Size, "Image size"),
        (Group::Density, "Density"),
    ];

    /// The name in report.json and of the group's SVG file.
    pub fn name(self) -> &'static str {
        match self {
            Group::Start => "start",
            Group::Roundtrip => "roundtrip",
            Group::Compute => "compute",
            Group::Memory => "memory",
            Group::Size => "size",
            Group::Density => "density",
        }
    }
}

/// Which clock measured a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Clock {
    /// Guest-reported (the guest's TSC or its own CLOCK_MONOTONIC).
    Guest,
    /// Host wall clock or host counters around the launch.
    Host,
}

impl Clock {
    pub fn name(self) -> &'static str {
        match self {
            Clock::Guest => "guest",
            Clock::Host => "host",
        }
    }
}

/// The unit of a row's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Unit {
    #[serde(rename = "us")]
    Us,
    #[serde(rename = "ns")]
    Ns,
    KiB,
    /// A ratio.
    #[serde(rename = "x")]
    Times,
    #[serde(rename = "1/s")]
    PerSecond,
}

impl Unit {
    pub fn name(self) -> &'static str {
        match self {
            Unit::Us => "us",
            Unit::Ns => "ns",
            Unit::KiB => "KiB",
            Unit::Times => "x",
            Unit::PerSecond => "1/s",
        }
    }
}

/// Rows carry the accelerator's label (what a reader of report.json
/// sees), not the enum's variant name.
fn accel_label<S: Serializer>(a: &Accel, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(a.label())
}

/// The reverse of `accel_label`, for readers of report.json (the demo).
fn accel_from_label<'de, D: Deserializer<'de>>(d: D) -> Result<Accel, D::Error> {
    let label = String::deserialize(d)?;
    Accel::from_label(&label)
        .ok_or_else(|| serde::de::Error::custom(format!("unknown accelerator {label:?}")))
}

/// One figure: the median of its samples, their spread and count, and
/// the samples themselves (report.json keeps every run's value).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub group: Group,
    pub path: String,
    pub metric: String,
    /// The median of `samples`.
    pub value: f64,
    pub min: f64,
    pub max: f64,
    pub unit: Unit,
    #[serde(serialize_with = "accel_label", deserialize_with = "accel_from_label")]
    pub accel: Accel,
    pub clock: Clock,
    /// How many samples (n).
    pub runs: usize,
    pub samples: Vec<f64>,
}

impl Row {
    /// This row with every sample (and so its statistics) mapped by `f`.
    pub fn map(&self, metric: &str, unit: Unit, f: impl Fn(f64) -> f64) -> Row {
        let samples: Vec<f64> = self.samples.iter().map(|&v| f(v)).collect();
        let (value, min, max) = stats(&samples);
        Row {
            metric: metric.into(),
            unit,
            value,
            min,
            max,
            samples,
            ..self.clone()
        }
    }
}

/// Median (upper middle for an even count), min and max; NaN for none.
fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match (s.first(), s.last()) {
        (Some(&lo), Some(&hi)) => (s[s.len() / 2], lo, hi),
        _ => (f64::NAN, f64::NAN, f64::NAN),
    }
}

/// Adds rows for one path under one accelerator: the parts every row of
/// the path shares are given once. Non-finite samples (a figure a run did
/// not produce) are left out, and a row with no sample at all.
pub struct PathRows<'a> {
    rows: &'a mut Vec<Row>,
    path: String,
    accel: Accel,
}

impl<'a> PathRows<'a> {
    pub fn new(rows: &'a mut Vec<Row>, path: &str, accel: Accel) -> PathRows<'a> {
        PathRows {
            rows,
            path: path.into(),
            accel,
        }
    }

    /// A figure the host's clock or counters measured, one sample per run.
    pub fn host(&mut self, group: Group, metric: &str, samples: &[f64], unit: Unit) -> &mut Self {
        self.add(group, metric, samples, unit, Clock::Host)
    }

    /// A figure the guest measured and reported, one sample per run.
    pub fn guest(&mut self, group: Group, metric: &str, samples: &[f64], unit: Unit) -> &mut Self {
        self.add(group, metric, samples, unit, Clock::Guest)
    }

    /// A figure measured by `clock`.
    pub fn add(
        &mut self,
        group: Group,
        metric: &str,
        samples: &[f64],
        unit: Unit,
        clock: Clock,
    ) -> &mut Self {
        let samples: Vec<f64> = samples.iter().copied().filter(|v| v.is_finite()).collect();
        if !samples.is_empty() {
            let (value, min, max) = stats(&samples);
            self.rows.push(Row {
                group,
                path: self.path.clone(),
                metric: metric.into(),
                value,
                min,
                max,
                unit,
                accel: self.accel,
                clock,
                runs: samples.len(),
                samples,
            });
        }
        self
    }
}

/// The median (upper middle for an even count); NaN for no values, which
/// [`PathRows`] then leaves out.
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// report.json keeps the strings it had when these were `&str`s.
    #[test]
    fn rows_serialize_to_the_old_strings() {
        let mut rows = vec![];
        PathRows::new(&mut rows, "p", Accel::Tcg)
            .guest(Group::Roundtrip, "m", &[3.0, 1.0, 2.0], Unit::Ns)
            .host(Group::Density, "d", &[f64::NAN], Unit::PerSecond)
            .host(Group::Density, "d", &[2.0], Unit::PerSecond);
        let j = serde_json::to_value(&rows).unwrap();
        assert_eq!(j[0]["group"], "roundtrip");
        assert_eq!(j[0]["clock"], "guest");
        assert_eq!(j[0]["unit"], "ns");
        assert_eq!(j[0]["accel"], Accel::Tcg.label());
        assert_eq!(j[0]["runs"], 3);
        assert_eq!(j[0]["value"], 2.0);
        assert_eq!(j[0]["min"], 1.0);
        assert_eq!(j[0]["max"], 3.0);
        assert_eq!(j[0]["samples"], serde_json::json!([3.0, 1.0, 2.0]));
        assert_eq!(j[1]["unit"], "1/s");
        assert_eq!(j[1]["runs"], 1);
        assert_eq!(rows.len(), 2, "the NaN row is left out");
        for (g, _) in Group::TABLES {
            assert_eq!(serde_json::to_value(g).unwrap(), g.name());
        }
        for u in [Unit::Us, Unit::KiB, Unit::Times] {
            assert_eq!(serde_json::to_value(u).unwrap(), u.name());
        }
        assert_eq!(serde_json::to_value(Clock::Host).unwrap(), "host");
    }
}
