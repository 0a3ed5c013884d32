//! Small helpers over `prometheus-client`'s encoder, for collectors that
//! read their values at scrape time (names without the `_total` suffix a
//! counter gets from the encoder).

use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

use crate::counters::HistogramSnapshot;

type R = Result<(), std::fmt::Error>;

/// An unlabelled counter.
pub fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> R {
    e.encode_descriptor(name, help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, _, u64>(&v, None)
}

/// A counter family with one label.
pub fn counters<'a>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    values: impl IntoIterator<Item = (&'a str, u64)>,
) -> R {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (l, v) in values {
        m.encode_family(&[(label, l)])?
            .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
    }
    Ok(())
}

/// A counter family with two labels.
pub fn counters2<'a>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    labels: [&str; 2],
    values: impl IntoIterator<Item = ([&'a str; 2], u64)>,
) -> R {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (l, v) in values {
        m.encode_family(&[(labels[0], l[0]), (labels[1], l[1])])?
            .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
    }
    Ok(())
}

/// An unlabelled gauge.
pub fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: f64) -> R {
    e.encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&v)
}

/// A gauge family with one label.
pub fn gauges<'a>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    values: impl IntoIterator<Item = (&'a str, f64)>,
) -> R {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (l, v) in values {
        m.encode_family(&[(label, l)])?.encode_gauge(&v)?;
    }
    Ok(())
}

/// An unlabelled histogram.
pub fn histogram(e: &mut DescriptorEncoder, name: &str, help: &str, h: &HistogramSnapshot) -> R {
    e.encode_descriptor(name, help, None, MetricType::Histogram)?
        .encode_histogram::<NoLabelSet>(h.sum, h.count, &h.buckets, None)
}

/// A histogram family with one label.
pub fn histograms<'a>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    values: impl IntoIterator<Item = (&'a str, &'a HistogramSnapshot)>,
) -> R {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (l, h) in values {
        m.encode_family(&[(label, l)])?
            .encode_histogram::<NoLabelSet>(h.sum, h.count, &h.buckets, None)?;
    }
    Ok(())
}
