//! Tool calls. With `tool_choice` `"required"` or a named function the call is made by
//! structured output (a grammar built from the tools' parameter schemas, as vLLM does), so any
//! model, even one never trained on tool calls, returns calls that parse. With `"auto"` the
//! model writes calls in its own format and the server's `--tool-call-parser` reads them out
//! (GLM-4.5's `<tool_call>` blocks, or GLM-4's name-then-JSON reply); `"none"` leaves the output
//! as text.

use serde_json::{json, Value};

use super::config::ToolCallParser;
use super::error::ApiError;
use crate::sampling::StructuredOutput;

/// What the tool fields ask of the output.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ToolPlan {
    /// Plain text.
    None,
    /// A JSON list of at least one `{"name", "parameters"}` object of the given tools.
    Required,
    /// The parameters object of this one function.
    Named(String),
    /// Whatever the model writes, calls read out by this parser; the tools' (name, parameters).
    Auto(ToolCallParser, Vec<(String, Value)>),
}

fn function(tool: &Value) -> Option<(&str, Value)> {
    let f = tool.get("function")?;
    let name = f.get("name")?.as_str()?;
    let params = f
        .get("parameters")
        .cloned()
        .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
    Some((name, params))
}

/// The plan and its grammar for `tools` (a list, already checked) and `tool_choice`.
pub(crate) fn plan(
    tools: Option<&Value>,
    tool_choice: Option<&Value>,
    parser: Option<ToolCallParser>,
    auto_by_default: bool,
) -> Result<(ToolPlan, Option<StructuredOutput>), ApiError> {
    let bad = |m: String| ApiError::bad_param("tool_choice", m);
    let list = tools
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let mut functions = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let (name, params) = function(t).ok_or_else(|| {
            ApiError::bad_param(
                "tools",
                format!("tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., \"parameters\": {{...}}}}}}."),
            )
        })?;
        if !params.is_object() {
            return Err(ApiError::bad_param(
                "tools",
                format!("tools[{i}].function.parameters must be a JSON schema object."),
            ));
        }
        functions.push((name, params));
    }
    let auto = || {
        match parser {
        Some(p) => Ok((
            ToolPlan::Auto(
                p,
                functions
                    .iter()
                    .map(|(n, s)| (n.to_string(), s.clone()))
                    .collect(),
            ),
            None,
        )),
        None => Err(bad(
            "\"auto\" tool choice needs the server started with --enable-auto-tool-choice and --tool-call-parser (glm45 or glm4); or use \"required\" or a named function."
                .into(),
        )),
    }
    };
    match tool_choice {
        None | Some(Value::Null) if auto_by_default && !functions.is_empty() => auto(),
        None | Some(Value::Null) => Ok((ToolPlan::None, None)),
        Some(Value::String(s)) if s == "none" => Ok((ToolPlan::None, None)),
        Some(Value::String(s)) if s == "auto" => auto(),
        Some(Value::String(s)) if s == "required" => {
            if functions.is_empty() {
                return Err(bad(
                    "tool_choice \"required\" needs a non-empty tools list.".into(),
                ));
            }
            let calls: Vec<Value> = functions
                .iter()
                .map(|(name, params)| {
                    json!({
                        "type": "object",
                        "properties": {"name": {"const": name}, "parameters": params},
                        "required": ["name", "parameters"],
                        "additionalProperties": false,
                    })
                })
                .collect();
            let schema = json!({"type": "array", "minItems": 1, "items": {"anyOf": calls}});
            Ok((ToolPlan::Required, Some(StructuredOutput::Json(schema))))
        }
        Some(v @ Value::Object(_)) => {
            let name = v
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    bad("tool_choice must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}.".into())
                })?;
            let (_, params) = functions.iter().find(|(n, _)| *n == name).ok_or_else(|| {
                bad(format!(
                    "tool_choice names the function {name:?}, which is not in tools."
                ))
            })?;
            Ok((
                ToolPlan::Named(name.to_string()),
                Some(StructuredOutput::Json(params.clone())),
            ))
        }
        Some(other) => Err(bad(format!(
            "tool_choice must be \"none\", \"auto\", \"required\" or a named function, got {other}."
        ))),
    }
}

/// An `"auto"` reply split into its text and its calls (OpenAI `tool_calls`, `None` when the
/// model called nothing, or wrote a call that does not parse: then it all stays text).
pub(crate) fn parse_auto(
    parser: ToolCallParser,
    functions: &[(String, Value)],
    text: &str,
    call_id: &str,
) -> (Option<String>, Option<Value>) {
    let calls = match parser {
        ToolCallParser::Glm45 => parse_glm45(functions, text),
        ToolCallParser::Glm4 => parse_glm4(functions, text),
    };
    match calls {
        Some((content, calls)) if !calls.is_empty() => {
            let calls = calls
                .into_iter()
                .enumerate()
                .map(|(i, (name, args))| {
                    json!({
                        "id": format!("call_{call_id}_{i}"),
                        "type": "function",
                        "function": {"name": name, "arguments": args.to_string()},
                    })
                })
                .collect();
            (content, Some(Value::Array(calls)))
        }
        _ => (Some(text.to_string()), None),
    }
}

type Calls = Vec<(String, Value)>;

/// GLM-4.5's `<tool_call>NAME\n<arg_key>K</arg_key>\n<arg_value>V</arg_value>...</tool_call>`
/// blocks (the name may be followed directly by the first key; a call may have no arguments).
/// A value is JSON where it parses as JSON and the parameter's schema does not say `string`.
fn parse_glm45(functions: &[(String, Value)], text: &str) -> Option<(Option<String>, Calls)> {
    const OPEN: &str = "<tool_call>";
    const CLOSE: &str = "</tool_call>";
    let first = text.find(OPEN)?;
    let content = text[..first].trim();
    let mut calls = Vec::new();
    let mut rest = &text[first..];
    while let Some(start) = rest.find(OPEN) {
        let body_start = start + OPEN.len();
        let end = rest[body_start..].find(CLOSE)? + body_start;
        let body = &rest[body_start..end];
        rest = &rest[end + CLOSE.len()..];
        let name_end = body.find(['\n', '<']).unwrap_or(body.len());
        let name = body[..name_end].trim();
        let (_, schema) = functions.iter().find(|(n, _)| n == name)?;
        let mut args = serde_json::Map::new();
        let mut a = &body[name_end..];
        while let Some(k) = a.find("<arg_key>") {
            let k_end = a[k..].find("</arg_key>")? + k;
            let key = a[k + "<arg_key>".len()..k_end].trim().to_string();
            a = &a[k_end + "</arg_key>".len()..];
            let v = a.find("<arg_value>")?;
            let v_end = a[v..].find("</arg_value>")? + v;
            let raw = &a[v + "<arg_value>".len()..v_end];
            a = &a[v_end + "</arg_value>".len()..];
            let is_string = schema["properties"][&key]["type"] == "string";
            let value = match serde_json::from_str::<Value>(raw.trim()) {
                Ok(v) if !is_string => v,
                _ => Value::String(raw.to_string()),
            };
            args.insert(key, value);
        }
        calls.push((name.to_string(), Value::Object(args)));
    }
    Some(((!content.is_empty()).then(|| content.to_string()), calls))
}

/// GLM-4's reply to a tool call: a known function's name on the first line, then a JSON object.
fn parse_glm4(functions: &[(String, Value)], text: &str) -> Option<(Option<String>, Calls)> {
    let t = text.trim_start();
    let (name, args) = t.split_once('\n')?;
    let name = name.trim();
    functions.iter().find(|(n, _)| n == name)?;
    let args: Value = serde_json::from_str(args.trim()).ok()?;
    args.is_object()
        .then(|| (None, vec![(name.to_string(), args)]))
}

/// Where an `"auto"` stream must stop sending text: at the start of a call, or of what may still
/// become one (a trailing prefix of `<tool_call>`; for GLM-4, a first line that may be a name).
pub(crate) fn auto_hold(
    parser: ToolCallParser,
    functions: &[(String, Value)],
    text: &str,
) -> usize {
    match parser {
        ToolCallParser::Glm45 => {
            const OPEN: &str = "<tool_call>";
            if let Some(i) = text.find(OPEN) {
                return i;
            }
            (1..OPEN.len())
                .rev()
                .find(|&k| text.ends_with(&OPEN[..k]))
                .map_or(text.len(), |k| text.len() - k)
        }
        ToolCallParser::Glm4 => {
            let t = text.trim_start();
            let line = t.split('\n').next().unwrap_or("").trim();
            let maybe_name = functions
                .iter()
                .any(|(n, _)| n.starts_with(line) || n == line);
            if maybe_name {
                0
            } else {
                text.len()
            }
        }
    }
}

/// OpenAI `tool_calls` from a constrained output, or `None` when it did not finish (it stays
/// content).
pub(crate) fn tool_calls(plan: &ToolPlan, text: &str, call_id: &str) -> Option<Value> {
    let call = |i: usize, name: &str, args: &Value| {
        json!({
            "id": format!("call_{call_id}_{i}"),
            "type": "function",
            "function": {"name": name, "arguments": args.to_string()},
        })
    };
    match plan {
        ToolPlan::None | ToolPlan::Auto(..) => None,
        ToolPlan::Named(name) => {
            let args: Value = serde_json::from_str(text).ok()?;
            Some(json!([call(0, name, &args)]))
        }
        ToolPlan::Required => {
            let list: Vec<Value> = serde_json::from_str(text).ok()?;
            let calls = list
                .iter()
                .enumerate()
                .map(|(i, c)| Some(call(i, c.get("name")?.as_str()?, c.get("parameters")?)))
                .collect::<Option<Vec<_>>>()?;
            Some(Value::Array(calls))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn functions() -> Vec<(String, Value)> {
        vec![
            (
                "get_weather".into(),
                json!({"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}),
            ),
            ("home".into(), json!({"type": "object", "properties": {}})),
        ]
    }

    fn calls(v: &Value) -> Vec<(String, Value)> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let f = &c["function"];
                let args = serde_json::from_str(f["arguments"].as_str().unwrap()).unwrap();
                (f["name"].as_str().unwrap().to_string(), args)
            })
            .collect()
    }

    #[test]
    fn glm45_blocks_become_calls_with_typed_arguments() {
        let text = "Let me check.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>123</arg_value>\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call><tool_call>home</tool_call>";
        let (content, c) = parse_auto(ToolCallParser::Glm45, &functions(), text, "x");
        assert_eq!(content.as_deref(), Some("Let me check."));
        assert_eq!(
            calls(&c.unwrap()),
            vec![
                ("get_weather".to_string(), json!({"city": "123", "days": 3})),
                ("home".to_string(), json!({})),
            ]
        );
        // GLM-4.7: the first key right after the name.
        let (_, c) = parse_auto(
            ToolCallParser::Glm45,
            &functions(),
            "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>",
            "x",
        );
        assert_eq!(calls(&c.unwrap())[0].1, json!({"city": "Paris"}));
    }

    #[test]
    fn unknown_functions_and_unclosed_blocks_stay_text() {
        for text in [
            "<tool_call>rm_rf\n</tool_call>",
            "<tool_call>get_weather\n<arg_key>city</arg_key>",
            "no call at all",
        ] {
            let (content, c) = parse_auto(ToolCallParser::Glm45, &functions(), text, "x");
            assert_eq!((content.as_deref(), c), (Some(text), None), "{text}");
        }
    }

    #[test]
    fn glm4_name_line_then_json() {
        let (content, c) = parse_auto(
            ToolCallParser::Glm4,
            &functions(),
            "get_weather\n{\"city\": \"Beijing\"}",
            "x",
        );
        assert_eq!(content, None);
        assert_eq!(
            calls(&c.unwrap())[0],
            ("get_weather".into(), json!({"city": "Beijing"}))
        );
        let (content, c) = parse_auto(ToolCallParser::Glm4, &functions(), "Sunny.\nBye", "x");
        assert_eq!((content.as_deref(), c), (Some("Sunny.\nBye"), None));
    }

    #[test]
    fn auto_needs_a_parser_and_tools_default_to_it_only_when_enabled() {
        let tools = json!([{"type": "function", "function": {"name": "home"}}]);
        let e = plan(Some(&tools), Some(&json!("auto")), None, false).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tool_choice"));
        assert!(e.message.contains("--tool-call-parser"), "{}", e.message);
        let (p, _) = plan(Some(&tools), None, None, false).unwrap();
        assert_eq!(p, ToolPlan::None);
        let (p, g) = plan(Some(&tools), None, Some(ToolCallParser::Glm45), true).unwrap();
        assert!(matches!(p, ToolPlan::Auto(ToolCallParser::Glm45, _)) && g.is_none());
    }

    #[test]
    fn streams_hold_back_what_may_become_a_call() {
        let f = functions();
        assert_eq!(auto_hold(ToolCallParser::Glm45, &f, "Hi <tool"), 3);
        assert_eq!(auto_hold(ToolCallParser::Glm45, &f, "Hi <tool_call>get"), 3);
        assert_eq!(auto_hold(ToolCallParser::Glm45, &f, "Hi there"), 8);
        assert_eq!(auto_hold(ToolCallParser::Glm4, &f, "get_wea"), 0);
        assert_eq!(auto_hold(ToolCallParser::Glm4, &f, "Sunny today"), 11);
    }
}
