//! `--config FILE`: every flag of a command can also come from a TOML file.
//!
//! Keys are the long flag names (`epoch = "25ms"`, `max-in-flight = 2`, `backup = "..."`);
//! booleans switch a flag on or off; arrays repeat it. Flags on the command line win over the
//! file. The file's settings are put in front of the command line's arguments and parsed by
//! the same clap definitions, so a file cannot set anything the command line could not, and
//! gets the same checks and error messages.

use anyhow::{bail, Context, Result};

/// Returns `args` with the settings of the `--config` file (if any) inserted after the
/// subcommand name, so that the command line's own flags come later and override them.
pub fn expand(args: Vec<String>) -> Result<Vec<String>> {
    let mut path = None;
    for (i, a) in args.iter().enumerate() {
        if a == "--config" {
            path = Some(args.get(i + 1).context("--config needs a file")?.clone());
        } else if let Some(p) = a.strip_prefix("--config=") {
            path = Some(p.to_string());
        }
    }
    let Some(path) = path else {
        return Ok(args);
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading the config file {path}"))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("{path} is not valid TOML"))?;
    let mut from_file = Vec::new();
    for (key, value) in table {
        if key == "config" {
            bail!("{path}: a config file cannot name another config file");
        }
        let flag = format!("--{key}");
        push_value(&mut from_file, &flag, &value).with_context(|| format!("{path}: key {key}"))?;
    }
    // argv[0], the subcommand, then the file's flags, then the command line's.
    let split = 2.min(args.len());
    let mut out = args[..split].to_vec();
    out.extend(from_file);
    out.extend(args[split..].iter().cloned());
    Ok(out)
}

fn push_value(out: &mut Vec<String>, flag: &str, value: &toml::Value) -> Result<()> {
    match value {
        toml::Value::Boolean(true) => out.push(flag.to_string()),
        toml::Value::Boolean(false) => {}
        toml::Value::String(s) => out.extend([flag.to_string(), s.clone()]),
        toml::Value::Integer(i) => out.extend([flag.to_string(), i.to_string()]),
        toml::Value::Float(f) => out.extend([flag.to_string(), f.to_string()]),
        toml::Value::Array(items) => {
            for v in items {
                push_value(out, flag, v)?;
            }
        }
        other => bail!("unsupported value {other}"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_settings_come_before_command_line_flags() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "epoch = \"50ms\"\nmax-in-flight = 3\nverbose = true\nquiet = false\n",
        )
        .unwrap();
        let args: Vec<String> = [
            "understudy",
            "primary",
            "--config",
            p.to_str().unwrap(),
            "--epoch",
            "10ms",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let out = expand(args).unwrap();
        let e = out.iter().position(|a| a == "50ms").unwrap();
        let cli = out.iter().position(|a| a == "10ms").unwrap();
        assert!(e < cli, "{out:?}");
        assert!(out.contains(&"--max-in-flight".to_string()) && out.contains(&"3".to_string()));
        assert!(out.contains(&"--verbose".to_string()) && !out.contains(&"--quiet".to_string()));
    }
}
