//! A client of BIRD's control socket: one command per line, answered by lines that start with
//! a four-digit reply code (BIRD's doc/reply_codes), `-` after the code while more lines
//! follow, a space after the code on the last one, and a leading space on a line that
//! continues the previous code.
use std::{path::Path, time::Duration};

use anyhow::{anyhow, bail, Context as _, Result};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{
        unix::{OwnedReadHalf, OwnedWriteHalf},
        UnixStream,
    },
};

/// How long BIRD may take to answer one command.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// BIRD's answer to a command: the code of its last line, and every line with its code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<(u16, String)>,
}

impl Reply {
    /// 8xxx (run-time) and 9xxx (parse) codes are refusals.
    pub fn is_error(&self) -> bool {
        self.code >= 8000
    }

    /// Every line's text, one per line.
    pub fn text(&self) -> String {
        self.lines.iter().map(|(_, l)| l.as_str()).collect::<Vec<_>>().join("\n")
    }
}

/// Accumulates reply lines; returns the reply once the last line has arrived.
#[derive(Default)]
struct Parser {
    lines: Vec<(u16, String)>,
}

impl Parser {
    fn push(&mut self, line: &str) -> Result<Option<Reply>> {
        let line = line.trim_end_matches(['\r', '\n']);
        if let Some(rest) = line.strip_prefix(' ') {
            let code = self.lines.last().map_or(0, |(c, _)| *c);
            self.lines.push((code, rest.to_string()));
            return Ok(None);
        }
        // Spontaneous printouts (`+`) are not part of an answer.
        if line.starts_with('+') {
            return Ok(None);
        }
        let (head, text) = (line.get(..4), line.get(5..).unwrap_or(""));
        let code =
            head.and_then(|h| h.parse::<u16>().ok()).ok_or_else(|| anyhow!("not a BIRD reply line: {line:?}"))?;
        self.lines.push((code, text.to_string()));
        match line.as_bytes().get(4) {
            Some(b'-') => Ok(None),
            Some(b' ') | None => Ok(Some(Reply { code, lines: std::mem::take(&mut self.lines) })),
            Some(_) => bail!("not a BIRD reply line: {line:?}"),
        }
    }
}

pub struct Birdc {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Birdc {
    /// Connects and reads BIRD's greeting (0001).
    pub async fn connect(path: &Path) -> Result<Self> {
        let stream = UnixStream::connect(path)
            .await
            .with_context(|| format!("cannot reach BIRD's control socket {}", path.display()))?;
        let (read, writer) = stream.into_split();
        let mut birdc = Self { reader: BufReader::new(read), writer };
        let hello = birdc.reply().await.context("no greeting from BIRD")?;
        if hello.code != 1 {
            bail!("unexpected greeting from BIRD: {:?}", hello.text());
        }
        Ok(birdc)
    }

    async fn reply(&mut self) -> Result<Reply> {
        let mut parser = Parser::default();
        let mut line = String::new();
        loop {
            line.clear();
            let n = tokio::time::timeout(REPLY_TIMEOUT, self.reader.read_line(&mut line))
                .await
                .map_err(|_| anyhow!("BIRD did not answer within {REPLY_TIMEOUT:?}"))??;
            if n == 0 {
                bail!("BIRD closed its control socket");
            }
            if let Some(reply) = parser.push(&line)? {
                return Ok(reply);
            }
        }
    }

    /// Sends one command; a refusal (8xxx/9xxx) is an Ok reply the caller judges.
    pub async fn command(&mut self, command: &str) -> Result<Reply> {
        self.writer.write_all(format!("{command}\n").as_bytes()).await.context("cannot write to BIRD")?;
        self.reply().await.with_context(|| format!("BIRD's answer to {command:?}"))
    }

    /// As [`Birdc::command`], with a refusal as an error.
    pub async fn ok(&mut self, command: &str) -> Result<Reply> {
        let reply = self.command(command).await?;
        if reply.is_error() {
            bail!("BIRD refused {command:?}: {} {}", reply.code, reply.text());
        }
        Ok(reply)
    }
}

/// A protocol as `show protocols` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Protocol {
    pub name: String,
    pub proto: String,
    /// "up", "down", "start", "stop", …
    pub state: String,
    /// For BGP the session state: "Established", "Active", "Connect", …; may be empty.
    pub info: String,
}

impl Protocol {
    pub fn up(&self) -> bool {
        self.state == "up"
    }
}

/// The 1002 lines of `show protocols`: `name proto table state since [info…]`. The time takes
/// one token with the agent's `timeformat protocol "%s"`, and the last words are the info
/// whatever the time format (an operator's BIRD may print "2026-12-02 10:00:00").
pub fn protocols(reply: &Reply) -> Vec<Protocol> {
    reply
        .lines
        .iter()
        .filter(|(code, _)| *code == 1002)
        .filter_map(|(_, line)| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let (name, proto, state) = (words.first()?, words.get(1)?, words.get(3)?);
            let info = words.get(5..).map(|w| {
                // "2026-12-02 10:00:00 Established": drop a second time token.
                let w = if w.first().is_some_and(|t| t.contains(':')) { &w[1..] } else { w };
                w.join(" ")
            });
            Some(Protocol {
                name: name.to_string(),
                proto: proto.to_string(),
                state: state.to_string(),
                info: info.unwrap_or_default(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Vec<Reply> {
        let mut parser = Parser::default();
        text.lines().filter_map(|l| parser.push(l).unwrap()).collect()
    }

    #[test]
    fn replies_end_at_a_code_and_a_space() {
        let replies = parse(
            "0001 BIRD 2.0.12 ready.\n\
             2002-Name       Proto      Table      State  Since         Info\n\
             1002-device1    Device     ---        up     1764634000    \n\
             \x20xlb_peer0  BGP        ---        up     1764634001    Established   \n\
             1002-xlb_vip4_0a000064 Static     master4    down   1764634000    \n\
             0000 \n\
             0011 Enabled.\n\
             9001 syntax error, unexpected CF_SYM_UNDEFINED\n",
        );
        assert_eq!(replies.len(), 4);
        assert_eq!(replies[0].code, 1);
        assert_eq!(replies[1].code, 0);
        let list = protocols(&replies[1]);
        assert_eq!(list.len(), 3);
        assert_eq!(list[1].name, "xlb_peer0");
        assert!(list[1].up());
        assert_eq!(list[1].info, "Established");
        assert_eq!(list[2].state, "down");
        assert!(!replies[2].is_error());
        assert!(replies[3].is_error());
    }

    #[test]
    fn a_two_token_time_is_not_the_info() {
        let reply = Reply {
            code: 0,
            lines: vec![(1002, "peer1 BGP --- start 2026-12-02 10:00:00 Active Socket: Connection refused".into())],
        };
        assert_eq!(protocols(&reply)[0].info, "Active Socket: Connection refused");
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(Parser::default().push("hello").is_err());
        assert!(Parser::default().push("00x1 hi").is_err());
    }
}
