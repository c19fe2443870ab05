use super::*;
use crate::config::Architecture;
use rand::{Rng, SeedableRng};
use serde_json::json;

/// The tiny Qwen3 tokenizer (byte-level BPE, `<|endoftext|>` = 0 and `<|im_end|>` = 2 special),
/// under a model whose logits have 600 entries (88 past the tokenizer, as real models pad).
fn grammars() -> (Grammars, Tokenizer) {
    let tok = Tokenizer::from_tokenizer(crate::tiny::train_tokenizer(Architecture::Qwen3, 512).unwrap());
    (Grammars::new(&tok, 600, &[0, 2]).unwrap(), tok)
}

/// Samples uniformly among the tokens the grammar allows, as a random-weight model would,
/// until an end-of-sequence token or `limit` tokens: the text and whether it ended.
fn walk(g: &Grammars, grammar: &TopLevelGrammar, seed: u64, limit: usize) -> (String, bool) {
    let mut guide = g.guide(grammar).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    for _ in 0..limit {
        let mask = guide.mask().unwrap();
        let mut logits: Vec<f32> = (0..600).map(|_| rng.random::<f32>()).collect();
        mask.apply(&mut logits);
        let allowed: Vec<u32> = (0..600u32).filter(|&t| logits[t as usize].is_finite()).collect();
        assert!(!allowed.is_empty(), "the mask allows nothing after {:?}", g.decode(&out));
        assert!(allowed.iter().all(|&t| t < 512), "an id past the tokenizer is allowed");
        // End as soon as the grammar allows it half the time, so that walks finish.
        let token = if allowed.contains(&2) && rng.random_bool(0.5) { 2 } else { allowed[rng.random_range(0..allowed.len())] };
        if token == 0 || token == 2 {
            return (g.decode(&out), true);
        }
        guide.advance(token).unwrap();
        out.push(token);
    }
    (g.decode(&out), false)
}

#[test]
fn every_finished_walk_under_a_json_schema_is_json_of_that_schema() {
    let (g, _) = grammars();
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        },
        "required": ["name", "age"],
        "additionalProperties": false,
    });
    let grammar = TopLevelGrammar::from_json_schema(schema);
    let mut finished = 0;
    for seed in 0..20 {
        let (text, ended) = walk(&g, &grammar, seed, 200);
        if !ended {
            continue;
        }
        finished += 1;
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        let o = v.as_object().unwrap();
        assert!(o.keys().all(|k| ["name", "age", "tags"].contains(&k.as_str())), "{text}");
        assert!(o["name"].as_str().unwrap().chars().count() <= 6, "{text}");
        assert!((0..=120).contains(&o["age"].as_i64().unwrap()), "{text}");
        if let Some(t) = o.get("tags") {
            assert!(t.as_array().unwrap().iter().all(|x| x == "a" || x == "b"), "{text}");
        }
    }
    assert!(finished >= 10, "only {finished} of 20 walks finished");
}

#[test]
fn a_regex_and_a_lark_grammar_hold_every_token() {
    let (g, _) = grammars();
    for seed in 0..10 {
        let (text, ended) = walk(&g, &TopLevelGrammar::from_regex(r"[a-c]{2,4}-[0-9]"), seed, 50);
        assert!(ended, "{text}");
        let re = regex_lite(&text);
        assert!(re, "{text:?} does not match");
        let (text, ended) = walk(&g, &TopLevelGrammar::from_lark(r#"start: "yes" | "no""#.into()), seed, 50);
        assert!(ended && (text == "yes" || text == "no"), "{text:?}");
    }
}

/// `[a-c]{2,4}-[0-9]`, by hand.
fn regex_lite(t: &str) -> bool {
    let Some((a, b)) = t.split_once('-') else { return false };
    (2..=4).contains(&a.len()) && a.chars().all(|c| ('a'..='c').contains(&c)) && b.len() == 1 && b.chars().all(|c| c.is_ascii_digit())
}

#[test]
fn reasoning_before_the_constraint_is_free_and_the_answer_is_held() {
    let (g, tok) = grammars();
    let lark = r#"start: think body
think[lazy]: /(.|\n)*<\/think>/
body: %json {"enum": ["left", "right"]}"#;
    let grammar = TopLevelGrammar::from_lark(lark.into());
    let mut guide = g.guide(&grammar).unwrap();
    // Free text (no JSON in sight) is allowed while reasoning...
    for t in tok.encode_with("hmm, a {bad json and more", false).unwrap() {
        assert!(guide.mask().unwrap().allows(t));
        guide.advance(t).unwrap();
    }
    for t in tok.encode_with("</think>", false).unwrap() {
        assert!(guide.mask().unwrap().allows(t));
        guide.advance(t).unwrap();
    }
    // ... and after it only the schema: `"l` or `"r`, never `x`.
    let x = tok.encode_with("x", false).unwrap()[0];
    assert!(!guide.mask().unwrap().allows(x));
    assert!(!guide.mask().unwrap().allows(2), "the end is allowed before the answer");
    for t in tok.encode_with("\"left\"", false).unwrap() {
        assert!(guide.mask().unwrap().allows(t));
        guide.advance(t).unwrap();
    }
    assert!(guide.accepting());
    assert!(guide.mask().unwrap().allows(2) && guide.mask().unwrap().allows(0));
}

#[test]
fn a_schema_feature_llguidance_lacks_is_named_and_a_bad_regex_is_refused() {
    let (g, _) = grammars();
    let e = g.guide(&TopLevelGrammar::from_json_schema(json!({"type": "array", "uniqueItems": true}))).unwrap_err();
    assert!(matches!(&e, GuideError::Grammar(m) if m.contains("uniqueItems")), "{e}");
    let e = g.guide(&TopLevelGrammar::from_regex("(unclosed")).unwrap_err();
    assert!(matches!(e, GuideError::Grammar(_)), "{e}");
    let e = g.guide(&TopLevelGrammar::from_lark("start: x\nx: undefined_rule".into())).unwrap_err();
    assert!(!e.to_string().contains('\n') && e.to_string().contains("undefined_rule"), "{e}");
    let e = g.guide_json("{not json").unwrap_err();
    assert!(e.to_string().contains("not a grammar"), "{e}");
}

#[test]
fn the_vocabulary_must_hold_the_end_tokens() {
    let (_, tok) = grammars();
    assert!(matches!(Grammars::new(&tok, 600, &[]), Err(GuideError::Tokenizer(_))));
    let e = Grammars::new(&tok, 600, &[700]).unwrap_err();
    assert!(e.to_string().contains("700"), "{e}");
}

#[test]
fn a_mask_forbids_what_it_does_not_allow_and_every_logit_past_it() {
    let (g, _) = grammars();
    let mut guide = g.guide(&TopLevelGrammar::from_lark(r#"start: "yes" | "no""#.into())).unwrap();
    let mask = guide.mask().unwrap();
    let mut logits = vec![1.0f32; 700];
    mask.apply(&mut logits);
    let kept: Vec<usize> = (0..700).filter(|&i| logits[i].is_finite()).collect();
    assert_eq!(kept.len(), mask.count(), "{kept:?}");
    assert!(kept.iter().all(|&i| mask.allows(i as u32) && i < 512), "{kept:?}");
    assert!(!kept.is_empty());
}
