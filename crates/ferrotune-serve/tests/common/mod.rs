//! The tiny chat fixture the serving tests run on: the model, its tokenizer and template, and
//! the questions they ask it.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use ferrotune_data::{ChatTemplate, Message, Role, SpecialTokens, Tokenizer};
use ferrotune_model::loaded::{load_model, LoadedModel};

pub const QUESTIONS: [&str; 6] = [
    "What is the capital of France?",
    "Which city is the capital of Japan?",
    "Reverse the word 'river'.",
    "What is 12 + 30?",
    "Name a prime number.",
    "What is the capital of Peru?",
];

pub fn chat_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/tiny_phi3_chat")
}

/// The tiny chat model (f32, CPU), its tokenizer and chat template.
pub fn chat_parts() -> (LoadedModel, Tokenizer, ChatTemplate) {
    let dir = chat_model();
    let loaded = load_model(dir.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    let tokenizer = Tokenizer::load(&dir).unwrap();
    let template =
        ChatTemplate::from_tokenizer_dir(&dir, SpecialTokens::from_tokenizer_dir(&dir).unwrap())
            .unwrap();
    (loaded, tokenizer, template)
}

/// `question` as one user turn with the generation prompt, tokenized.
pub fn prompt_ids(tokenizer: &Tokenizer, template: &ChatTemplate, question: &str) -> Vec<u32> {
    let text = template
        .render(
            &[Message {
                role: Role::User,
                content: question.to_string(),
            }],
            true,
        )
        .unwrap();
    tokenizer.encode(&text).unwrap().ids
}
