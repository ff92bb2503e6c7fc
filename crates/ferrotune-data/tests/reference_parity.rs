//! Every token and label must match transformers' `apply_chat_template` +
//! `return_assistant_tokens_mask` on the committed fixtures (scripts/make_data_reference.py).

use std::path::{Path, PathBuf};

use ferrotune_data::label_mask::tokenize_conversation;
use ferrotune_data::{ChatTemplate, Message, SpecialTokens, Tokenizer};
use serde::Deserialize;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn tokenizer_dir() -> PathBuf {
    fixtures().join("tokenizer/phi3")
}

#[derive(Deserialize)]
struct Reference {
    name: String,
    messages: Vec<Message>,
    text: String,
    input_ids: Vec<u32>,
    labels: Vec<i64>,
}

fn references() -> Vec<Reference> {
    let text = std::fs::read_to_string(fixtures().join("data/phi3_chat_reference.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn template() -> ChatTemplate {
    let dir = tokenizer_dir();
    ChatTemplate::from_tokenizer_dir(&dir, SpecialTokens::from_tokenizer_dir(&dir).unwrap())
        .unwrap()
}

#[test]
fn rendered_text_tokens_and_labels_match_transformers_exactly() {
    let template = template();
    let tokenizer = Tokenizer::load(&tokenizer_dir()).unwrap();
    assert!(
        tokenizer.uses_fast_encoder(),
        "Phi-3's tokenizer has the fast encoder's shape"
    );
    let refs = references();
    assert!(
        refs.len() >= 30,
        "fixture holds {} conversations",
        refs.len()
    );
    for r in refs {
        let text = template.render(&r.messages, false).unwrap();
        assert_eq!(text, r.text, "{}: rendered text differs", r.name);
        let got = tokenize_conversation(&template, &tokenizer, &r.messages).unwrap();
        assert_eq!(got.ids, r.input_ids, "{}: input_ids differ", r.name);
        assert_eq!(got.labels(), r.labels, "{}: labels differ", r.name);
    }
}

#[test]
fn the_fast_encoder_gives_the_tokenizers_crate_ids_and_offsets() {
    let fast = Tokenizer::load(&tokenizer_dir()).unwrap();
    let plain = Tokenizer::load_as_written(&tokenizer_dir()).unwrap();
    assert!(!plain.uses_fast_encoder());
    let mut texts: Vec<String> = references().into_iter().map(|r| r.text).collect();
    texts.extend([
        "   leading spaces".to_string(),
        "trailing spaces   ".to_string(),
        "a  b   c    d\t\te\n\n f".to_string(),
        "▁literal▁metaspace▁chars ▁ ▁▁".to_string(),
        "mixed 中文 and emoji 🦙🦙 and ćirilica ђ".to_string(),
        "<|user|>\n  <|assistant|>   x<|end|>\n".to_string(),
        String::new(),
        " ".to_string(),
        "\n".to_string(),
        "<|end|>".to_string(),
        "<|end|>   \n\t ".to_string(),
        "x<|end|><|end|>  <|user|>y".to_string(),
        "<s></s><unk> <|endoftext|>".to_string(),
        "\u{E000}\u{F8FF} private use and \u{0}\u{1} control \u{FEFF} bom".to_string(),
        "   \u{3000}ideographic space\u{00A0}nbsp".to_string(),
        "https://example.com/a_b-c?d=e&f=g#h".to_string(),
        "日本語のテキストは空白がないのでとても長い単語になります".repeat(20),
    ]);
    let sample =
        std::fs::read_to_string(fixtures().join("ultrachat_sample/jsonl/train_sft.jsonl")).unwrap();
    texts.push(sample);
    for t in &texts {
        assert_eq!(fast.encode(t).unwrap(), plain.encode(t).unwrap(), "{t:?}");
    }
}

#[test]
fn known_tokens_have_phi3_ids() {
    let tok = Tokenizer::load(&tokenizer_dir()).unwrap();
    for (token, id) in [
        ("<|endoftext|>", 32000),
        ("<|assistant|>", 32001),
        ("<|system|>", 32006),
        ("<|end|>", 32007),
        ("<|user|>", 32010),
    ] {
        assert_eq!(tok.token_to_id(token), Some(id), "{token}");
    }
    assert_eq!(tok.vocab_size(), 32011);
}

#[test]
fn the_assistant_turn_is_trained_through_its_closing_end_token_only() {
    let template = template();
    let tokenizer = Tokenizer::load(&tokenizer_dir()).unwrap();
    let r = references()
        .into_iter()
        .find(|r| r.name == "multi_turn")
        .unwrap();
    let got = tokenize_conversation(&template, &tokenizer, &r.messages).unwrap();
    let end = 32007;
    // Each trained run ends with <|end|> and the token after it (a header or EOS) is not trained.
    let mut runs = 0;
    for i in 0..got.ids.len() {
        let starts_run = got.trainable[i] && (i == 0 || !got.trainable[i - 1]);
        let ends_run = got.trainable[i] && (i + 1 == got.ids.len() || !got.trainable[i + 1]);
        runs += usize::from(starts_run);
        if ends_run {
            assert_eq!(got.ids[i], end, "a trained run ends at <|end|>");
        }
        if starts_run {
            assert_eq!(got.ids[i - 1], 32001, "a trained run follows <|assistant|>");
        }
    }
    assert_eq!(runs, 3, "three assistant turns");
    assert_eq!(*got.ids.last().unwrap(), 32000);
    assert!(
        !got.trainable.last().unwrap(),
        "EOS after the last turn is not trained"
    );
}

#[test]
fn the_fast_encoder_agrees_on_random_texts() {
    let fast = Tokenizer::load(&tokenizer_dir()).unwrap();
    let plain = Tokenizer::load_as_written(&tokenizer_dir()).unwrap();
    let pieces = [
        " ",
        "  ",
        "\n",
        "\t",
        "a",
        "the",
        "▁",
        "ing",
        "Hello",
        "é",
        "ć",
        "ђ",
        "中",
        "🦙",
        "Ꙋ",
        "<|end|>",
        "<|user|>",
        "<|assistant|>",
        "<|endoftext|>",
        "<s>",
        "<",
        "|",
        ">",
        "0",
        "42",
        ".",
        ",",
        "'",
        "\u{3000}",
        "\u{a0}",
        "\r\n",
        "über",
        "naïve",
        "\u{0301}",
    ];
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..3000 {
        let len = (next() % 24) as usize;
        let text: String = (0..len)
            .map(|_| pieces[(next() % pieces.len() as u64) as usize])
            .collect();
        assert_eq!(
            fast.encode(&text).unwrap(),
            plain.encode(&text).unwrap(),
            "{text:?}"
        );
    }
}

#[test]
fn the_fast_span_finder_agrees_with_turn_by_turn_probing() {
    use ferrotune_data::label_mask::{assistant_spans, probed_spans};
    let template = template();
    for r in references() {
        let text = template.render(&r.messages, false).unwrap();
        // Twice: the first call fills the closing cache, the second uses it.
        for _ in 0..2 {
            let fast = assistant_spans(&template, &r.messages, &text).unwrap();
            let probed = probed_spans(&template, &r.messages, &text).unwrap();
            assert_eq!(fast, probed, "{}", r.name);
        }
    }
}

#[test]
fn templates_that_trim_content_are_masked_on_the_trimmed_text() {
    use ferrotune_data::label_mask::assistant_spans;
    use ferrotune_data::Role;
    let src =
        "{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}</{{ m.role }}>\n{% endfor %}";
    let template = ChatTemplate::new(src.into(), SpecialTokens::default()).unwrap();
    let msgs = vec![
        Message {
            role: Role::User,
            content: "  hi  ".into(),
        },
        Message {
            role: Role::Assistant,
            content: "  hello there \n".into(),
        },
    ];
    let text = template.render(&msgs, false).unwrap();
    assert_eq!(
        text,
        "<user>hi</user>\n<assistant>hello there</assistant>\n"
    );
    let spans = assistant_spans(&template, &msgs, &text).unwrap();
    assert_eq!(spans.len(), 1);
    let s = spans[0];
    assert_eq!(&text[s.content_start..s.content_end], "hello there");
    assert_eq!(&text[s.content_end..s.closing_end], "</assistant>\n");
}
