//! JSON merge patches (RFC 7396) on a listener's wire form: a `PATCH` body is an object of
//! the fields to change, in the same spelling as the listener itself (`{"persist": 600}`,
//! `{"health_check": {"interval": 10}}`, `null` to go back to a default). It is merged into
//! the listener's current JSON and the result parsed and validated like a new listener, so a
//! patch can set exactly what a listener can hold — no hand-copied patch structs to drift.

use serde_json::Value;

use super::model::{ConfigError, ListenerSpec, WireListener};

/// Merges `patch` into `target` (RFC 7396).
pub fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(serde_json::Map::new());
            }
            if let Value::Object(t) = target {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// Fields a patch may not change: a listener's identity and its backends (which have their
/// own endpoints).
const FIXED: [&str; 4] = ["name", "vip", "proto", "backend"];

/// `listener` with `patch` applied. The result is not validated as part of a whole
/// configuration yet (the caller's transaction does that).
pub fn apply(listener: &ListenerSpec, patch: &Value) -> Result<ListenerSpec, ConfigError> {
    let Value::Object(fields) = patch else {
        return Err(ConfigError::Invalid(
            "a listener patch is a JSON object of the fields to change".into(),
        ));
    };
    for f in FIXED {
        if fields.contains_key(f) {
            return Err(ConfigError::Invalid(format!(
                "{f} cannot be changed by a patch (remove the listener and add it again; backends have their own endpoints)"
            )));
        }
    }
    let mut v = serde_json::to_value(WireListener::from(listener.clone()))
        .map_err(|e| ConfigError::Invalid(e.to_string()))?;
    merge(&mut v, patch);
    serde_json::from_value::<ListenerSpec>(v)
        .map_err(|e| ConfigError::Invalid(format!("invalid patch: {e}")))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::control::model::{CheckKind, Proto};

    fn web() -> ListenerSpec {
        ListenerSpec::new(
            "web",
            "10.0.0.1:80".parse::<std::net::SocketAddr>().unwrap(),
            Proto::Tcp,
        )
    }

    #[test]
    fn patches_change_only_what_they_name() {
        let p = apply(
            &web(),
            &json!({"persist": 600, "health_check": {"interval": 10}}),
        )
        .unwrap();
        assert_eq!(p.persist, 600);
        assert_eq!(p.health_check.interval, 10);
        assert_eq!(p.health_check.kind, CheckKind::Tcp);
        let back = apply(&p, &json!({"persist": 0})).unwrap();
        assert_eq!(back.persist, 0);
        assert_eq!(back.health_check.interval, 10);
    }

    #[test]
    fn null_resets_to_the_default_and_unknown_fields_are_refused() {
        let p = apply(&web(), &json!({"idle_timeout": 30})).unwrap();
        assert_eq!(p.idle_timeout_secs(), 30);
        let p = apply(&p, &json!({"idle_timeout": null})).unwrap();
        assert_eq!(p.idle_timeout_secs(), 900);
        let e = apply(&web(), &json!({"persistence": 5}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `persistence`"), "{e}");
        let e = apply(&web(), &json!({"cookie_name": "x"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cookie_name does not apply to tcp"), "{e}");
        let e = apply(&web(), &json!({"vip": "10.0.0.2:80"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("vip cannot be changed"), "{e}");
    }
}
