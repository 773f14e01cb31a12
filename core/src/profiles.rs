//! OTLP profiles (the development version of the protocol) as one batch: the message's
//! resources and the one dictionary every index in them points into. Batching needs two things
//! the other signals get for free: appending one message to another moves the second's
//! dictionary entries behind the first's and renumbers its indices, and splitting gives every
//! part the dictionary.
//!
//! Pure data work; no I/O here.

use std::collections::HashMap;

use opentelemetry_proto::tonic::profiles::v1development::{
    Profile, ProfilesData, ProfilesDictionary, ResourceProfiles, ScopeProfiles,
};

/// Samples in `data`: what a profiles batch counts as its items, as the Collector does.
pub fn sample_count(data: &ProfilesData) -> usize {
    data.resource_profiles
        .iter()
        .flat_map(|rp| &rp.scope_profiles)
        .flat_map(|sp| &sp.profiles)
        .map(|p| p.samples.len())
        .sum()
}

/// A dictionary with only the zero values every table must start with.
pub fn empty_dictionary() -> ProfilesDictionary {
    ProfilesDictionary {
        mapping_table: vec![Default::default()],
        location_table: vec![Default::default()],
        function_table: vec![Default::default()],
        link_table: vec![Default::default()],
        string_table: vec![String::new()],
        attribute_table: vec![Default::default()],
        stack_table: vec![Default::default()],
    }
}

/// Index `i` of another dictionary's table, moved behind `base` entries of ours (0 stays 0:
/// the zero value every table starts with).
fn moved(i: i32, base: usize) -> i32 {
    if i <= 0 {
        0
    } else {
        i + base as i32 - 1
    }
}

/// Appends `other` to `into`: its resources after `into`'s, its dictionary entries after
/// `into`'s (strings already there are reused), its indices renumbered to match.
pub fn append(into: &mut ProfilesData, other: ProfilesData) {
    let dictionary = into.dictionary.get_or_insert_with(empty_dictionary);
    let Some(theirs) = other.dictionary else {
        into.resource_profiles.extend(other.resource_profiles);
        return;
    };
    let mut known: HashMap<String, i32> = dictionary
        .string_table
        .iter()
        .enumerate()
        .map(|(i, s)| (s.clone(), i as i32))
        .collect();
    let strings: Vec<i32> = theirs
        .string_table
        .into_iter()
        .map(|s| {
            *known.entry(s.clone()).or_insert_with(|| {
                dictionary.string_table.push(s);
                (dictionary.string_table.len() - 1) as i32
            })
        })
        .collect();
    let string = |i: i32| strings.get(i as usize).copied().unwrap_or(0);
    let base = Bases {
        mapping: dictionary.mapping_table.len(),
        location: dictionary.location_table.len(),
        function: dictionary.function_table.len(),
        link: dictionary.link_table.len(),
        attribute: dictionary.attribute_table.len(),
        stack: dictionary.stack_table.len(),
    };
    let attributes = |list: &mut Vec<i32>| {
        for i in list.iter_mut() {
            *i = moved(*i, base.attribute);
        }
    };
    for mut m in theirs.mapping_table.into_iter().skip(1) {
        m.filename_strindex = string(m.filename_strindex);
        attributes(&mut m.attribute_indices);
        dictionary.mapping_table.push(m);
    }
    for mut l in theirs.location_table.into_iter().skip(1) {
        l.mapping_index = moved(l.mapping_index, base.mapping);
        for line in &mut l.lines {
            line.function_index = moved(line.function_index, base.function);
        }
        attributes(&mut l.attribute_indices);
        dictionary.location_table.push(l);
    }
    for mut f in theirs.function_table.into_iter().skip(1) {
        f.name_strindex = string(f.name_strindex);
        f.system_name_strindex = string(f.system_name_strindex);
        f.filename_strindex = string(f.filename_strindex);
        dictionary.function_table.push(f);
    }
    dictionary
        .link_table
        .extend(theirs.link_table.into_iter().skip(1));
    for mut a in theirs.attribute_table.into_iter().skip(1) {
        a.key_strindex = string(a.key_strindex);
        a.unit_strindex = string(a.unit_strindex);
        dictionary.attribute_table.push(a);
    }
    for mut s in theirs.stack_table.into_iter().skip(1) {
        for i in &mut s.location_indices {
            *i = moved(*i, base.location);
        }
        dictionary.stack_table.push(s);
    }
    for mut rp in other.resource_profiles {
        for sp in &mut rp.scope_profiles {
            for p in &mut sp.profiles {
                for vt in p.sample_type.iter_mut().chain(p.period_type.iter_mut()) {
                    vt.type_strindex = string(vt.type_strindex);
                    vt.unit_strindex = string(vt.unit_strindex);
                }
                attributes(&mut p.attribute_indices);
                for s in &mut p.samples {
                    s.stack_index = moved(s.stack_index, base.stack);
                    s.link_index = moved(s.link_index, base.link);
                    attributes(&mut s.attribute_indices);
                }
            }
        }
        into.resource_profiles.push(rp);
    }
}

struct Bases {
    mapping: usize,
    location: usize,
    function: usize,
    link: usize,
    attribute: usize,
    stack: usize,
}

/// Splits `data` into messages of at most `max_samples` samples each (a profile with more is cut
/// into several with the same description), each with the whole dictionary.
pub fn split(data: ProfilesData, max_samples: usize) -> Vec<ProfilesData> {
    let dictionary = data.dictionary;
    let mut parts: Vec<Vec<ResourceProfiles>> = vec![Vec::new()];
    let mut room = max_samples;
    for mut rp in data.resource_profiles {
        let scopes = std::mem::take(&mut rp.scope_profiles);
        for mut sp in scopes {
            let profiles = std::mem::take(&mut sp.profiles);
            for mut profile in profiles {
                loop {
                    if room == 0 {
                        parts.push(Vec::new());
                        room = max_samples;
                    }
                    let take = room.min(profile.samples.len());
                    let rest = profile.samples.split_off(take);
                    room -= take;
                    let piece = Profile {
                        samples: std::mem::replace(&mut profile.samples, rest),
                        ..profile.clone()
                    };
                    push_profile(parts.last_mut().expect("never empty"), &rp, &sp, piece);
                    if profile.samples.is_empty() {
                        break;
                    }
                }
            }
        }
    }
    parts
        .into_iter()
        .filter(|p| !p.is_empty())
        .map(|resource_profiles| ProfilesData {
            resource_profiles,
            dictionary: dictionary.clone(),
        })
        .collect()
}

/// Adds `profile` under `rp`'s resource and `sp`'s scope to `part`, reusing the last resource
/// and scope when they are the same.
fn push_profile(
    part: &mut Vec<ResourceProfiles>,
    rp: &ResourceProfiles,
    sp: &ScopeProfiles,
    profile: Profile,
) {
    let same_resource = part
        .last()
        .is_some_and(|last| last.resource == rp.resource && last.schema_url == rp.schema_url);
    if !same_resource {
        part.push(ResourceProfiles {
            resource: rp.resource.clone(),
            scope_profiles: Vec::new(),
            schema_url: rp.schema_url.clone(),
        });
    }
    let resource = part.last_mut().expect("just pushed");
    let same_scope = resource
        .scope_profiles
        .last()
        .is_some_and(|last| last.scope == sp.scope && last.schema_url == sp.schema_url);
    if !same_scope {
        resource.scope_profiles.push(ScopeProfiles {
            scope: sp.scope.clone(),
            profiles: Vec::new(),
            schema_url: sp.schema_url.clone(),
        });
    }
    resource
        .scope_profiles
        .last_mut()
        .expect("just pushed")
        .profiles
        .push(profile);
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::profiles::v1development::{
        Function, Line, Location, Mapping, Sample, Stack, ValueType,
    };

    /// A message with one profile whose samples each have a one-frame stack naming `names[i]`,
    /// with value i + 1.
    fn message(names: &[&str]) -> ProfilesData {
        let mut d = empty_dictionary();
        d.string_table.push("samples".into());
        d.string_table.push("count".into());
        d.string_table.push("/bin/app".into());
        d.mapping_table.push(Mapping {
            filename_strindex: 3,
            ..Default::default()
        });
        let mut samples = Vec::new();
        for (i, name) in names.iter().enumerate() {
            d.string_table.push(name.to_string());
            d.function_table.push(Function {
                name_strindex: d.string_table.len() as i32 - 1,
                ..Default::default()
            });
            d.location_table.push(Location {
                mapping_index: 1,
                address: 0x1000 + i as u64,
                lines: vec![Line {
                    function_index: d.function_table.len() as i32 - 1,
                    ..Default::default()
                }],
                ..Default::default()
            });
            d.stack_table.push(Stack {
                location_indices: vec![d.location_table.len() as i32 - 1],
            });
            samples.push(Sample {
                stack_index: d.stack_table.len() as i32 - 1,
                values: vec![i as i64 + 1],
                ..Default::default()
            });
        }
        ProfilesData {
            resource_profiles: vec![ResourceProfiles {
                scope_profiles: vec![ScopeProfiles {
                    profiles: vec![Profile {
                        sample_type: Some(ValueType {
                            type_strindex: 1,
                            unit_strindex: 2,
                        }),
                        samples,
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
            dictionary: Some(d),
        }
    }

    /// Each sample as (function name, mapping file, value, sample type).
    fn resolved(data: &ProfilesData) -> Vec<(String, String, i64, String)> {
        let d = data.dictionary.as_ref().unwrap();
        let s = |i: i32| d.string_table[i as usize].clone();
        let mut out = Vec::new();
        for p in data
            .resource_profiles
            .iter()
            .flat_map(|r| &r.scope_profiles)
            .flat_map(|s| &s.profiles)
        {
            for sample in &p.samples {
                let stack = &d.stack_table[sample.stack_index as usize];
                let location = &d.location_table[stack.location_indices[0] as usize];
                let function = &d.function_table[location.lines[0].function_index as usize];
                let mapping = &d.mapping_table[location.mapping_index as usize];
                out.push((
                    s(function.name_strindex),
                    s(mapping.filename_strindex),
                    sample.values[0],
                    s(p.sample_type.unwrap().type_strindex),
                ));
            }
        }
        out
    }

    #[test]
    fn append_renumbers_the_second_dictionary_and_reuses_strings() {
        let mut a = message(&["main", "work"]);
        let b = message(&["other", "main"]);
        let expected: Vec<_> = resolved(&a).into_iter().chain(resolved(&b)).collect();
        append(&mut a, b);
        assert_eq!(resolved(&a), expected);
        assert_eq!(sample_count(&a), 4);
        let strings = &a.dictionary.as_ref().unwrap().string_table;
        assert_eq!(
            strings.iter().filter(|s| s.as_str() == "main").count(),
            1,
            "a string both had is kept once: {strings:?}"
        );
    }

    #[test]
    fn split_keeps_every_sample_in_order_within_the_limit() {
        let data = message(&["a", "b", "c", "d", "e"]);
        let parts = split(data.clone(), 2);
        assert_eq!(
            parts.iter().map(sample_count).collect::<Vec<_>>(),
            vec![2, 2, 1]
        );
        let rejoined: Vec<_> = parts.iter().flat_map(resolved).collect();
        assert_eq!(rejoined, resolved(&data));
    }
}
