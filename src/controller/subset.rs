//! Whether an object already carries a server-side-apply partial object: the
//! API server defaults fields we never set (`imagePullPolicy`, probe
//! thresholds...), so "what we applied" is compared as a subset of what is
//! there, never for equality. This is what keeps an idle cluster write-free.

use serde_json::Value;

/// The keys Kubernetes merges list items by, in the lists our partials carry.
const MERGE_KEYS: [&str; 3] = ["name", "mountPath", "containerPort"];

/// Whether every field of `wanted` is present in `current` with the same
/// value. Lists whose items all carry a merge key are matched by that key;
/// other lists (args, command) must be equal.
pub fn contains(current: &Value, wanted: &Value) -> bool {
    match (current, wanted) {
        (Value::Object(have), Value::Object(want)) => want
            .iter()
            .all(|(k, w)| have.get(k).is_some_and(|h| contains(h, w))),
        (Value::Array(have), Value::Array(want)) => {
            let key = MERGE_KEYS
                .into_iter()
                .find(|key| !want.is_empty() && want.iter().all(|w| w.get(key).is_some()));
            match key {
                Some(key) => want.iter().all(|w| {
                    have.iter()
                        .find(|h| h.get(key) == w.get(key))
                        .is_some_and(|h| contains(h, w))
                }),
                None => {
                    have.len() == want.len() && have.iter().zip(want).all(|(h, w)| contains(h, w))
                }
            }
        }
        (Value::Number(h), Value::Number(w)) => h.as_f64() == w.as_f64(),
        (h, w) => h == w,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn server_defaults_do_not_count_as_a_difference() {
        let current = json!({"spec": {"containers": [
            {"name": "app", "image": "a", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
             "imagePullPolicy": "IfNotPresent"},
            {"name": "other"}]}});
        let wanted = json!({"spec": {"containers": [{"name": "app", "env": [{"name": "B", "value": "2"}]}]}});
        assert!(contains(&current, &wanted));
    }

    #[test]
    fn a_changed_value_or_missing_item_is_a_difference() {
        let current = json!({"spec": {"containers": [{"name": "app", "env": [{"name": "B", "value": "2"}]}]}});
        assert!(!contains(
            &current,
            &json!({"spec": {"containers": [{"name": "app", "env": [{"name": "B", "value": "3"}]}]}})
        ));
        assert!(!contains(
            &current,
            &json!({"spec": {"containers": [{"name": "app", "env": [{"name": "C", "value": "2"}]}]}})
        ));
        assert!(!contains(
            &json!({"args": ["--a", "--b"]}),
            &json!({"args": ["--a"]})
        ));
    }
}
