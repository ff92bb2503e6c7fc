//! The README.md of an adapter-only export: a Hugging Face model card (YAML front matter that the
//! Hub and PEFT read: base model, library, tags) naming the data, the parameters and the metrics.

use candle_core::DType;

use crate::lineage::Lineage;
use crate::source::Source;

/// The lineage as JSON beside the adapter (read by `ferrotune models register`).
pub const LINEAGE_FILE: &str = "ferrotune_lineage.json";

pub fn render(source: &Source, lineage: &Lineage, dtype: DType) -> String {
    let mut s = String::new();
    s += "---\n";
    s += &format!("base_model: {}\n", yaml_scalar(&source.base_model));
    s += "library_name: peft\npipeline_tag: text-generation\ntags:\n- lora\n- ferrotune\n- phi3\n";
    s += "---\n\n";
    s += &format!(
        "# LoRA adapter for {}\n\nTrained with ferrotune {}{}. Load it with PEFT:\n\n",
        source.base_model,
        lineage.ferrotune_version,
        lineage
            .git_commit
            .as_deref()
            .map(|c| format!(" (commit {c})"))
            .unwrap_or_default()
    );
    s += &format!(
        "```python\nfrom peft import AutoPeftModelForCausalLM\nmodel = AutoPeftModelForCausalLM.from_pretrained(\"<this folder>\")\n```\n\nor with ferrotune: `ferrotune generate --model {} --adapter <this folder> --prompt ...`\n\n",
        source.base_model
    );
    s += "## Adapter\n\n| | |\n|---|---|\n";
    let lora = &source.lora;
    s += &format!(
        "| rank r | {} |\n| lora_alpha | {} |\n",
        lora.r, lora.lora_alpha
    );
    s += &format!(
        "| scale | {} ({}) |\n",
        lora.scale(),
        if lora.use_rslora {
            "alpha/√r, rsLoRA"
        } else {
            "alpha/r"
        }
    );
    s += &format!(
        "| target modules | {} |\n| dropout | {} |\n| weights dtype | {dtype:?} |\n",
        lora.target_modules.join(", "),
        lora.lora_dropout
    );
    s += "\n## Training\n\n| | |\n|---|---|\n";
    let opt = |v: Option<String>| v.unwrap_or_else(|| "—".into());
    s += &format!("| base model | {} |\n", source.base_model);
    s += &format!(
        "| base model fingerprint | `{}` |\n",
        lineage.base_model_fingerprint
    );
    s += &format!("| checkpoint | {} |\n", opt(lineage.checkpoint.clone()));
    s += &format!(
        "| steps | {} |\n| epochs | {} |\n| tokens seen | {} |\n",
        opt(lineage.step.map(|v| v.to_string())),
        opt(lineage.epoch.map(|v| format!("{v:.3}"))),
        opt(lineage.tokens_seen.map(|v| v.to_string()))
    );
    s += &format!(
        "| data (cache key) | {} |\n| config hash | {} |\n",
        opt(lineage.data_cache_key.clone()),
        opt(lineage.config_hash.clone())
    );
    s += &format!(
        "| eval loss at this step | {} |\n| best eval loss | {} |\n",
        opt(lineage.eval_loss.map(|v| format!("{v:.4}"))),
        opt(lineage.best_eval_loss.map(|v| format!("{v:.4}")))
    );
    if let Some(l) = lineage.eval_loss {
        s += &format!("| eval perplexity | {:.3} |\n", l.exp());
    }
    if let Some(cfg) = &source.config_yaml {
        s += "\n## Training config\n\n```yaml\n";
        s += cfg.trim_end();
        s += "\n```\n";
    }
    s
}

/// A YAML plain scalar, quoted when it could be read as something else.
fn yaml_scalar(v: &str) -> String {
    if v.chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        && !v.is_empty()
    {
        v.to_string()
    } else {
        serde_json::to_string(v).expect("a string serialises")
    }
}
