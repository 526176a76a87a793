//! `tools` with `tool_choice` of `"required"` or a named function: the call is made by
//! structured output (a grammar built from the tools' parameter schemas, as vLLM does), so any
//! model, even one never trained on tool calls, returns calls that parse. `"auto"` needs a
//! parser of the model's own tool-call format and is refused until one is built; `"none"` (the
//! default, as in vLLM) leaves the output as text.

use serde_json::{json, Value};

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
    match tool_choice {
        None | Some(Value::Null) => Ok((ToolPlan::None, None)),
        Some(Value::String(s)) if s == "none" => Ok((ToolPlan::None, None)),
        Some(Value::String(s)) if s == "auto" => Err(bad(
            "\"auto\" tool choice needs a tool-call parser for the model's own format, which this server does not have yet; use \"required\" or a named function."
                .into(),
        )),
        Some(Value::String(s)) if s == "required" => {
            if functions.is_empty() {
                return Err(bad("tool_choice \"required\" needs a non-empty tools list.".into()));
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
                bad(format!("tool_choice names the function {name:?}, which is not in tools."))
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
        ToolPlan::None => None,
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
