//! GloVe word vectors from a text file given by path (`word v1 ... vD` per
//! line, as the Stanford downloads are written), for the words of a
//! vocabulary. Nothing is downloaded.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;

use crate::data::DataError;
use crate::text::Vocab;

/// Vectors of the words of `vocab` found in the GloVe file at `path`, by
/// vocabulary index. Every line must hold a word and `dim` numbers; lines of
/// words outside the vocabulary are only counted, not parsed.
pub fn read_glove(
    path: &Path,
    vocab: &Vocab,
    dim: usize,
) -> Result<BTreeMap<usize, Vec<f32>>, DataError> {
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let bad = |line: usize, message: String| DataError::Text {
        path: path.to_path_buf(),
        line,
        message,
    };
    let mut found = BTreeMap::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| DataError::io(path, e))?;
        let mut parts = line.split(' ');
        let word = parts.next().unwrap_or_default();
        if word.is_empty() {
            continue;
        }
        let fields = parts.clone().count();
        if fields != dim {
            return Err(bad(
                i + 1,
                format!("{fields} numbers after the word, expected {dim} (the --embed-dim)"),
            ));
        }
        let Some(index) = vocab.get(word) else {
            continue;
        };
        let v: Vec<f32> = parts
            .map(|p| p.parse::<f32>())
            .collect::<Result<_, _>>()
            .map_err(|e| bad(i + 1, format!("not a number: {e}")))?;
        found.insert(index, v);
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_vocabulary_words_and_names_bad_lines() {
        let dir = crate::data::test_dir("glove");
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("g.txt");
        std::fs::write(&p, "the 0.5 -1\nred 1 2\nzebra 3 4\n").unwrap();
        let vocab = Vocab::words(["what is red", "the red one"], 1);
        let got = read_glove(&p, &vocab, 2).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[&vocab.get("red").unwrap()], vec![1.0, 2.0]);
        assert_eq!(got[&vocab.get("the").unwrap()], vec![0.5, -1.0]);
        let err = read_glove(&p, &vocab, 3).unwrap_err().to_string();
        assert!(
            err.contains("g.txt: line 1") && err.contains("expected 3"),
            "{err}"
        );
        std::fs::write(&p, "red 1 x\n").unwrap();
        let err = read_glove(&p, &vocab, 2).unwrap_err().to_string();
        assert!(err.contains("line 1: not a number"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
