//! Remote write 1.0 requests: the protobuf messages of the protocol (prost), built from flattened
//! samples, split by sample count, snappy-compressed. Pure: no I/O here.

use prost::Message as _;

#[derive(Clone, PartialEq, prost::Message)]
pub struct WriteRequest {
    #[prost(message, repeated, tag = "1")]
    pub timeseries: Vec<TimeSeries>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TimeSeries {
    #[prost(message, repeated, tag = "1")]
    pub labels: Vec<Label>,
    #[prost(message, repeated, tag = "2")]
    pub samples: Vec<Sample>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Label {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Sample {
    #[prost(double, tag = "1")]
    pub value: f64,
    #[prost(int64, tag = "2")]
    pub timestamp: i64,
}

/// One time series per sample (all at `timestamp_ms`), external labels added where the data has
/// no label of that name, labels sorted; split into requests of at most `max_samples`.
pub fn build_requests(
    samples: Vec<(Vec<(String, String)>, f64)>,
    external_labels: &std::collections::BTreeMap<String, String>,
    timestamp_ms: i64,
    max_samples: usize,
) -> Vec<WriteRequest> {
    let series: Vec<TimeSeries> = samples
        .into_iter()
        .map(|(mut labels, value)| {
            for (k, v) in external_labels {
                if !labels.iter().any(|(name, _)| name == k) {
                    labels.push((k.clone(), v.clone()));
                }
            }
            labels.sort();
            TimeSeries {
                labels: labels
                    .into_iter()
                    .map(|(name, value)| Label { name, value })
                    .collect(),
                samples: vec![Sample {
                    value,
                    timestamp: timestamp_ms,
                }],
            }
        })
        .collect();
    series
        .chunks(max_samples.max(1))
        .map(|chunk| WriteRequest {
            timeseries: chunk.to_vec(),
        })
        .collect()
}

/// The body as sent: protobuf, snappy block format.
pub fn encode(request: &WriteRequest) -> Vec<u8> {
    snap::raw::Encoder::new()
        .compress_vec(&request.encode_to_vec())
        .expect("snappy accepts any input size below 4 GiB")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_split_sort_labels_and_round_trip_through_snappy() {
        let samples = (0..5)
            .map(|i| {
                (
                    vec![
                        ("__name__".to_string(), "m".to_string()),
                        ("a".to_string(), i.to_string()),
                    ],
                    i as f64,
                )
            })
            .collect();
        let external = [("cluster".to_string(), "prod".to_string())]
            .into_iter()
            .collect();
        let requests = build_requests(samples, &external, 1_700_000_000_000, 2);
        assert_eq!(
            requests
                .iter()
                .map(|r| r.timeseries.len())
                .collect::<Vec<_>>(),
            vec![2, 2, 1]
        );
        let first = &requests[0].timeseries[0];
        let names: Vec<&str> = first.labels.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, vec!["__name__", "a", "cluster"]);
        assert_eq!(
            first.samples,
            vec![Sample {
                value: 0.0,
                timestamp: 1_700_000_000_000
            }]
        );
        let body = encode(&requests[1]);
        let decoded = WriteRequest::decode(
            snap::raw::Decoder::new()
                .decompress_vec(&body)
                .unwrap()
                .as_slice(),
        )
        .unwrap();
        assert_eq!(decoded, requests[1]);
    }
}
